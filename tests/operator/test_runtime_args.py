"""Never render flags the runtime refuses: every pod's rendered args, for every example and
every resource the operator tests build from one, go through what `pinnace serve` does
before it serves (`build_config`: argparse, then the full EngineConfig with its
validation), in the environment the pod gets (a LeaderWorkerSet pod's
LWS_* variables). A resource is either refused by the operator or runs; and what the
operator refuses as RuntimeUnsupported at start, the runtime refuses too, so
operator/runtime_support.py moves with the runtime in both directions.

The test resources are found in the test files themselves: each `example(NAME, **spec)`,
`body(NAME, **spec)` or `create_llmd(NAME, **spec)` call whose overrides are literals.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.cli.main import build_parser
from pinnace.cli.serve import build_config
from pinnace.operator.fit import check_fit
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import render_all
from pinnace.operator.runtime_support import REASON, check_runtime_support, start_refusals

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).parent
EXAMPLES = {p.stem: p for p in sorted((REPO / "examples").glob("*.yaml"))}
BUILDERS = {"example", "body", "create_llmd"}  # (NAME, **spec overrides) in the tests
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
# Parallel layouts beyond what the examples and tests spell out (tp, pp, gpu.count).
LAYOUTS = [(2, 1, 2), (4, 1, 4), (2, 2, 4), (8, 2, 8), (2, 1, 1), (4, 4, 4)]


def example_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = yaml.safe_load(EXAMPLES[name].read_text())
    body["spec"].update(copy.deepcopy(spec))
    return dict(body)


def scan_test_resources() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, body) for each literal example-based resource in tests/operator/test_*.py."""
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in BUILDERS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in EXAMPLES
            ):
                continue
            try:
                spec = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            except ValueError:
                continue  # overrides computed at run time
            if len(spec) == len(node.keywords):
                yield f"{path.name}:{node.lineno}", example_body(node.args[0].value, spec)


def all_resources() -> list[tuple[str, dict[str, Any]]]:
    cases = [(f"examples/{name}", example_body(name, {})) for name in EXAMPLES]
    cases += list(scan_test_resources())
    for tp, pp, gpus in LAYOUTS:
        for name in ("gpu", "pvc-model", "multi-node", "kserve", "adapters", "embeddings"):
            parallel = {"tensorParallelSize": tp, "pipelineParallelSize": pp}
            body = example_body(name, {})
            body["spec"]["engine"] = {**body["spec"].get("engine", {}), **parallel}
            body["spec"]["resources"] = {**body["spec"].get("resources", {}),
                                         "gpu": {"count": gpus}}  # fmt: skip
            cases.append((f"examples/{name} tp={tp} pp={pp} gpus={gpus}", body))
    return cases


RESOURCES = all_resources()


def pods(llmd: LLMDeployment) -> list[tuple[str, list[str], dict[str, str]]]:
    """(pod, args, LeaderWorkerSet environment) for every runtime pod the operator renders."""
    out = []
    for obj in render_all(llmd):
        spec = obj["spec"]
        if obj["kind"] == "Deployment":
            out.append(("Deployment", spec["template"]["spec"]["containers"][0]["args"], {}))
        elif obj["kind"] == "ServingRuntime":
            out.append(("ServingRuntime", spec["containers"][0]["args"], {}))
        elif obj["kind"] == "LeaderWorkerSet":
            group = spec["leaderWorkerTemplate"]
            for index in range(group["size"]):
                template = group["leaderTemplate" if index == 0 else "workerTemplate"]
                env = {
                    "LWS_LEADER_ADDRESS": f"{llmd.name}-0.{llmd.name}.{llmd.namespace}",
                    "LWS_GROUP_SIZE": str(group["size"]),
                    "LWS_WORKER_INDEX": str(index),
                }
                out.append((f"group pod {index}", template["spec"]["containers"][0]["args"], env))
    return out


def serve_config(
    args: list[str], env: dict[str, str], model: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """What `pinnace serve` makes of these args in this environment (ValueError if it
    refuses them): `serve.run` up to the point where it starts serving."""
    for name in LWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert args[0] == "serve"
    argv = ["serve", str(model), *args[2:]]  # the pod's model path, here a folder that exists
    config, _ = build_config(build_parser().parse_args(argv))
    return config


@pytest.mark.parametrize(("where", "body"), RESOURCES, ids=[w for w, _ in RESOURCES])
def test_the_operator_refuses_what_the_runtime_refuses(
    where: str, body: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        llmd = parse_llmdeployment(body)
        check_fit(llmd)
    except SpecError:
        return  # an invalid resource: nothing is rendered (test_validation.py)
    try:
        check_runtime_support(llmd)
    except SpecError as err:
        assert err.reason == REASON
        if start_refusals(llmd):  # the runtime must refuse these args at start too
            refused = []
            for pod, args, env in pods(llmd):
                try:
                    serve_config(args, env, tmp_path, monkeypatch)
                except ValueError as exc:
                    refused.append(f"{pod}: {exc}")
            assert refused, f"the runtime now runs {where}: update operator/runtime_support.py"
        return
    engine = llmd.spec.engine
    for pod, args, env in pods(llmd):
        config = serve_config(args, env, tmp_path, monkeypatch)  # raises if refused
        assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (
            engine.tensor_parallel_size,
            engine.pipeline_parallel_size,
        ), pod
        assert config.nnodes == llmd.group_size, pod
        assert config.node_rank == int(env.get("LWS_WORKER_INDEX", 0)), pod
        assert config.local_world_size == engine.world_size // llmd.group_size, pod


def test_the_scan_finds_the_tests_resources() -> None:
    found = list(scan_test_resources())
    assert len(found) >= 40  # the count in the test files when this was written: 50+
    where = {w.split(":")[0] for w, _ in found}
    assert {"test_render.py", "test_kserve.py", "test_operator.py"} <= where
