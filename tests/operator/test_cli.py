"""`pinnace render` and `pinnace operator`, through the real entry point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from pinnace.cli.main import main
from pinnace.operator.llmdeployment import parse_llmdeployment
from pinnace.operator.reconcile import reconcile
from pinnace.operator.render import render_all

REPO = Path(__file__).resolve().parents[2]
INVALID = Path(__file__).parent / "data" / "invalid"
PINNACE = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pinnace"


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "name", ["minimal-cpu", "gpu", "pvc-model", "adapters"], ids=lambda n: f"examples/{n}"
)
def test_render_prints_exactly_the_objects_the_operator_applies(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = REPO / "examples" / f"{name}.yaml"
    code, out, err = render(capsys, "-f", str(path))
    assert (code, err) == (0, "")
    printed = list(yaml.safe_load_all(out))
    assert printed == render_all(parse_llmdeployment(yaml.safe_load(path.read_text())))
    for obj in printed:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    assert "&id" not in out and "*id" not in out  # plain YAML, no anchors


def test_render_error_is_one_line_with_the_degraded_message(
    capsys: pytest.CaptureFixture[str], cluster: Any, kube_client: Any, create_llmd: Any
) -> None:
    body = yaml.safe_load((INVALID / "adapter-clash.yaml").read_text())
    code, out, err = render(capsys, "-f", str(INVALID / "adapter-clash.yaml"))
    assert code == 2 and out == "" and err.count("\n") == 1
    prefix = "pinnace render: error: "
    assert err.startswith(prefix)
    # The operator, given the same resource, says the same thing in the Degraded condition.
    base = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"
    created = cluster.post(base, body)
    reconcile(kube_client, created)
    cr = cluster.get(f"{base}/adapter-clash")
    [degraded] = [c for c in cr["status"]["conditions"] if c["type"] == "Degraded"]
    assert err == prefix + degraded["message"] + "\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ((INVALID / "bad-dtype.yaml").read_text(), "spec.engine.dtype: Input should be"),
        ("spec: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a YAML mapping, got list"),
        ("", "no LLMDeployment found"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "expected kind LLMDeployment"),
    ],
)
def test_bad_input_never_shows_a_trace(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(content)
    code, out, err = render(capsys, "-f", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err
    code, _, err = render(capsys, "-f", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.count("\n") == 1 and "missing.yaml" in err


def test_render_crd_prints_the_committed_crd(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render(capsys, "--crd")
    assert code == 0 and out == (REPO / "crds" / "pinnace.dev_llmdeployments.yaml").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pinnace_operator_runs_against_a_kubeconfig(
    cluster: Any, create_llmd: Any, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "kmock", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    create_llmd("minimal-cpu")
    port = _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    liveness = f"http://127.0.0.1:{port}/healthz"
    cmd = [str(PINNACE), "operator", "--all-namespaces", "--standalone", "--liveness", liveness]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while cluster.get("/apis/apps/v1/namespaces/ml/deployments/smollm2") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("operator exited or hung:\n" + proc.communicate()[0].decode()[-3000:])
            time.sleep(0.1)
        assert httpx.get(liveness, timeout=5).status_code == 200
        auth = [r.headers.get("Authorization") for r in cluster.requests() if r.method == "PATCH"]
        assert auth and all(a == "Bearer test-token" for a in auth)  # kubeconfig credentials
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output[-2000:]
