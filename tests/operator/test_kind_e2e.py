"""hack/kind-e2e.sh stays in step with the repository (it cannot run here: no Docker).

Its --dry-run prints every command it would run; each path, Dockerfile target, image,
resource name, port and model name in them is checked against the real source of that
fact. And the pods it waits for would start: the `pinnace serve` arguments the operator
renders for each example are accepted by the real CLI parser.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pinnace.cli.main import build_parser
from pinnace.operator import names
from pinnace.operator.llmdeployment import parse_llmdeployment
from pinnace.operator.render import render_all
from pinnace.operator.render.args import serve_args

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "kind-e2e.sh"


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The dry run's commands, split like the shell would (run from elsewhere on purpose)."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=tmp_path_factory.mktemp("e2e"),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},  # no kind/docker/helm needed for a dry run
    )
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line.rstrip(" &")) for line in lines]


def find(steps: list[list[str]], *prefix: str) -> list[list[str]]:
    return [s for s in steps if s[: len(prefix)] == list(prefix)]


def option(step: list[str], name: str) -> str:
    return step[step.index(name) + 1]


def chart_values() -> dict[str, str]:
    chart = yaml.safe_load((REPO / "helm" / "pinnace" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "helm" / "pinnace" / "values.yaml").read_text())
    return {"version": chart["appVersion"], "operator_repo": values["image"]["repository"]}


def test_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert SCRIPT.stat().st_mode & 0o111, "hack/kind-e2e.sh must be executable"


def test_steps_run_in_order(steps: list[list[str]]) -> None:
    order = [" ".join(s[:2]) for s in steps]
    expected = [
        "kind create",
        "docker build",
        "docker build",
        "kind load",
        "helm install",
        "kubectl apply",
        "kubectl wait",
        "kubectl get",
        "kubectl port-forward",
        "curl -sf",
        "kind delete",  # cleanup on exit (unless --keep)
    ]
    assert order == expected


def test_images_are_built_from_real_targets_and_used_by_default(steps: list[list[str]]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    built = {option(s, "--target"): option(s, "-t") for s in find(steps, "docker", "build")}
    assert set(built) == {"runtime", "operator"}
    for target in built:
        assert f" AS {target}\n" in dockerfile
    facts = chart_values()
    # What the operator runs by default and what the chart deploys: no override needed.
    assert built["runtime"] == names.DEFAULT_IMAGE
    assert built["operator"] == f"{facts['operator_repo']}:{facts['version']}"
    [load] = find(steps, "kind", "load", "docker-image")
    assert set(load[5:]) == set(built.values())
    [create] = find(steps, "kind", "create", "cluster")
    assert option(load, "--name") == option(create, "--name")


def test_chart_install_and_example(steps: list[list[str]]) -> None:
    [install] = find(steps, "helm", "install")
    assert (REPO / install[3] / "Chart.yaml").is_file()
    facts = chart_values()
    sets = dict(install[i + 1].split("=", 1) for i, w in enumerate(install) if w == "--set")
    assert sets == {"image.repository": facts["operator_repo"], "image.tag": facts["version"]}
    [apply] = find(steps, "kubectl", "apply")
    example_path = REPO / option(apply, "-f")
    example = yaml.safe_load(example_path.read_text())
    meta, spec = example["metadata"], example["spec"]
    assert option(apply, "--namespace") == meta["namespace"]
    [wait] = find(steps, "kubectl", "wait")
    assert f"llmdeployment/{meta['name']}" in wait and "--for=condition=Ready" in wait
    [forward] = find(steps, "kubectl", "port-forward")
    assert f"svc/{meta['name']}" in forward
    port = forward[-1].split(":")[1]
    [service] = [o for o in render_all(parse_llmdeployment(example)) if o["kind"] == "Service"]
    assert service["metadata"]["name"] == meta["name"]
    assert int(port) == service["spec"]["ports"][0]["port"]
    [curl] = find(steps, "curl")
    assert curl[2].endswith(f":{forward[-1].split(':')[0]}/v1/chat/completions")
    assert f'"model": "{spec["model"]["servedName"]}"' in option(curl, "-d")
    # The example serves the model baked into the image: nothing to download in kind.
    assert spec["model"]["uri"].startswith("file:///models/") and "gpu" not in spec["resources"]


@pytest.mark.parametrize(
    "path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: f"examples/{p.stem}"
)
def test_rendered_serve_args_are_accepted_by_pinnace_serve(path: Path) -> None:
    llmd = parse_llmdeployment(yaml.safe_load(path.read_text()))
    args = build_parser().parse_args(serve_args(llmd))  # argparse exits on unknown flags
    assert args.command == "serve" and args.port == llmd.spec.serving.port
    assert args.served_model_name == [llmd.served_name]
