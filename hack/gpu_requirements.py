"""Print the requirements this python lacks for hack/gpu-check.sh, space-separated.

The project's dependencies (pyproject.toml), the `gpu` extra (unless --no-gpu) and the test
tools the gpu tests import; a requirement counts as present when an installed distribution
of that name satisfies its version specifier.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib import metadata
from pathlib import Path

TEST_TOOLS = ["pytest>=8", "pytest-timeout", "httpx"]


def satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: the name alone decides
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            return False
        return True
    req = Requirement(requirement)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-gpu", action="store_true", help="leave out the gpu extra")
    args = parser.parse_args()
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + TEST_TOOLS
    if not args.no_gpu:
        wanted += [f"{r}>=0.6,<0.7" if r == "flashinfer-python" else r
                   for r in project["optional-dependencies"]["gpu"]]  # fmt: skip
    print(
        " ".join(f"'{r}'" if any(c in r for c in "<>") else r for r in wanted if not satisfied(r))
    )


if __name__ == "__main__":
    main()
