"""pyproject lists every package folder (the folder -> import-name mapping needs it)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"runtime": "pinnace.runtime", "operator": "pinnace.operator", "cli": "pinnace.cli"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in MAPPING.items()}
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(config["packages"])


# Run from the repository root with the cwd on sys.path (as `python -c` or `python -m` would
# put it), import every pinnace module, and report where `operator` and the folder names
# resolved. The stdlib `operator` is imported during interpreter start-up, before the cwd
# can shadow it; what can go wrong is code that imports a folder by its bare name
# (`import runtime.config`, `from operator.render import ...`), which works only from here.
PROBE = """
import json, pkgutil, importlib, sys
import pinnace.runtime, pinnace.operator, pinnace.cli
for pkg in (pinnace.runtime, pinnace.operator, pinnace.cli) if WALK else ():
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
top = ("runtime", "cli")
names = [n for n in sys.modules if n.split(".")[0] in top or n.startswith("operator.")]
print(json.dumps({"operator": sys.modules["operator"].__file__,
                  "pinnace.operator": pinnace.operator.__file__, "bare": sorted(names)}))
"""


def _probe(extra: str = "", walk: bool = True) -> dict:
    code = f"WALK = {walk}\n{extra}{PROBE}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_no_module_imports_a_folder_by_its_bare_name() -> None:
    found = _probe()
    assert found["bare"] == []
    assert Path(found["operator"]).parent == Path(sysconfig.get_paths()["stdlib"])
    assert Path(found["pinnace.operator"]).parent == ROOT / "operator"


def test_the_probe_sees_a_bare_import() -> None:
    """The check above can fail: a bare `import runtime.config` from the root is reported."""
    assert "runtime.config" in _probe("import runtime.config\n", walk=False)["bare"]
