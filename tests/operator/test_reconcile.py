"""reconcile() over HTTP against the API emulator, without kopf: apply, drift, idempotence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.operator.client import ApiError, HttpKubeClient
from pinnace.operator.llmdeployment import parse_llmdeployment
from pinnace.operator.reconcile import reconcile
from pinnace.operator.render import render_all

DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/qwen-chat"
SERVICE = "/api/v1/namespaces/ml/services/qwen-chat"
PVC = "/api/v1/namespaces/ml/persistentvolumeclaims/qwen-chat-cache"
PDB = "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/qwen-chat"
REPO = Path(__file__).resolve().parents[2]


def run(cluster: Any, client: HttpKubeClient, path: str) -> Any:
    body = cluster.get(path)
    assert body is not None
    return reconcile(client, body)


def test_first_pass_creates_owned_children_and_status(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu")
    result = run(cluster, kube_client, path)
    assert result.applied == [
        "PersistentVolumeClaim/qwen-chat-cache",
        "Service/qwen-chat",
        "Deployment/qwen-chat",
        "PodDisruptionBudget/qwen-chat",  # two replicas: drains take one at a time
    ]
    cr = cluster.get(path)
    for child in (DEPLOYMENT, SERVICE, PVC, PDB):
        obj = cluster.get(child)
        assert obj is not None, child
        [owner] = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "pinnace.dev/v1alpha1",
            "kind": "LLMDeployment",
            "name": "qwen-chat",
            "uid": cr["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    # What was applied is exactly what `pinnace render` prints, plus the ownerReference.
    for rendered in render_all(parse_llmdeployment(cr)):
        live = cluster.get(
            {"Deployment": DEPLOYMENT, "Service": SERVICE, "PodDisruptionBudget": PDB}.get(
                rendered["kind"], PVC
            )
        )
        live["metadata"].pop("ownerReferences")
        for server_field in ("uid", "resourceVersion", "generation", "creationTimestamp"):
            live["metadata"].pop(server_field)
        assert live == rendered
    status = cr["status"]
    assert status["phase"] == "Pending" and status["observedGeneration"] == 1
    assert status["endpoint"] == "http://qwen-chat.ml.svc.cluster.local:8000/v1"
    assert (
        status["effective"]["args"]
        == cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert (
        status["selector"] == "app.kubernetes.io/instance=qwen-chat,app.kubernetes.io/name=pinnace"
    )
    assert [e.reason for e in result.events] == ["Created"] * 4


def test_second_pass_with_nothing_changed_writes_nothing(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu")
    run(cluster, kube_client, path)
    before = len(cluster.requests())
    result = run(cluster, kube_client, path)
    assert result.applied == [] and result.events == []
    assert cluster.writes(since=before) == []
    reads = [r for r in cluster.requests()[before:] if r.method == "GET"]
    assert len(reads) >= 4  # it did look: the resource and each child


def test_drift_is_corrected_and_dropped_fields_are_removed(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu")
    run(cluster, kube_client, path)
    # Someone edits the Deployment by hand: the next pass puts the spec back.
    edit = {"spec": {"template": {"spec": {"priorityClassName": "batch"}}}}
    assert cluster.patch(DEPLOYMENT, edit).status_code == 200
    assert run(cluster, kube_client, path).applied == ["Deployment/qwen-chat"]
    assert cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]["priorityClassName"] == "inference"
    # The user drops nodeSelector from the resource: it disappears from the pods (SSA).
    assert cluster.patch(path, {"spec": {"scheduling": {"nodeSelector": None}}}).status_code == 200
    assert run(cluster, kube_client, path).applied == ["Deployment/qwen-chat"]
    assert "nodeSelector" not in cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]
    assert cluster.get(path)["status"]["observedGeneration"] == 2


def test_ready_deployment_makes_the_resource_ready(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu")
    run(cluster, kube_client, path)
    ready = {
        "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    }
    assert cluster.patch(DEPLOYMENT + "/status", ready).status_code == 200
    result = run(cluster, kube_client, path)
    status = cluster.get(path)["status"]
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2
    ready_condition = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready_condition["status"] == "True" and status["endpoint"] in ready_condition["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Normal", "Ready")]


def test_invalid_spec_is_degraded_and_rolls_nothing_out(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu", engine={"extraArgs": ["--dtype", "float16"]})
    result = run(cluster, kube_client, path)
    message = "engine.extraArgs: --dtype is set by the operator; use engine.dtype"
    assert result.error is not None and str(result.error) == message
    assert cluster.get(DEPLOYMENT) is None and cluster.get(SERVICE) is None
    status = cluster.get(path)["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "InvalidSpec",
        message,
    )
    assert status["phase"] == "Degraded"
    before = len(cluster.requests())
    run(cluster, kube_client, path)
    assert cluster.writes(since=before) == []  # no retry storm of status writes either


def _without_cel_rules(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _without_cel_rules(v) for k, v in node.items() if k != "x-kubernetes-validations"
        }
    return [_without_cel_rules(v) for v in node] if isinstance(node, list) else node


def test_a_rule_the_api_server_skipped_degrades_before_any_pod_runs(
    cluster: Any, kube_client: HttpKubeClient
) -> None:
    """A cluster that does not evaluate the CRD's CEL rules (Kubernetes before 1.25) stores
    quantizeLmHead false without int8/fp8, which the runtime refuses at start: the operator's
    copy of the rule refuses it instead of rendering a crash-looping pod."""
    cluster.apply_crd(
        _without_cel_rules(
            yaml.safe_load((REPO / "crds" / "pinnace.dev_llmdeployments.yaml").read_text())
        )
    )
    body = yaml.safe_load((REPO / "examples" / "gpu.yaml").read_text())
    body["spec"]["engine"]["quantizeLmHead"] = False
    path = f"/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments/{body['metadata']['name']}"
    cluster.post(path.rsplit("/", 1)[0], body)
    result = run(cluster, kube_client, path)
    message = (
        "spec.engine: quantizeLmHead false applies only to quantization int8 or fp8 "
        "(quantized at load): set one of them, or remove quantizeLmHead"
    )
    assert result.error is not None and str(result.error) == message
    assert cluster.get(DEPLOYMENT) is None
    degraded = next(c for c in cluster.get(path)["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "InvalidSpec",
        message,
    )
    # The user quantizes at load: the head stays in floats and the resource recovers.
    assert cluster.patch(path, {"spec": {"engine": {"quantization": "int8"}}}).status_code == 200
    assert run(cluster, kube_client, path).error is None
    args = cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-quantize-lm-head" in args and args[args.index("--quantization") + 1] == "int8"
    degraded = next(c for c in cluster.get(path)["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"


def _condition(cluster: Any, path: str, type_: str) -> dict[str, Any] | None:
    conditions = cluster.get(path)["status"]["conditions"]
    return next((c for c in conditions if c["type"] == type_), None)


def test_lm_head_flag_in_extra_args_keeps_working_after_the_upgrade(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    """--no-quantize-lm-head in extraArgs predates spec.engine.quantizeLmHead: honoured as
    the field (deprecated, one Warning), its pods rendered as before (no rollout)."""
    engine = yaml.safe_load((REPO / "examples" / "gpu.yaml").read_text())["spec"]["engine"]
    engine |= {"quantization": "int8", "extraArgs": ["--no-quantize-lm-head"]}
    # As the API server stores it after the CRD upgrade: the field's default filled in.
    path = create_llmd("gpu", engine={**engine, "quantizeLmHead": True})
    result = run(cluster, kube_client, path)
    assert result.error is None
    args = cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args.count("--no-quantize-lm-head") == 1 and args[-1] == "--no-quantize-lm-head"
    warnings = [(e.reason, e.message) for e in result.events if e.type == "Warning"]
    message = (
        "engine.extraArgs: --no-quantize-lm-head is deprecated; "
        "set engine.quantizeLmHead: false instead"
    )
    assert warnings == [("Deprecated", message)]
    assert _condition(cluster, path, "Deprecated") is not None
    ready = {
        "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
    }
    assert cluster.patch(DEPLOYMENT + "/status", ready).status_code == 200
    result = run(cluster, kube_client, path)
    assert [e.reason for e in result.events] == ["Ready"]  # warned once, not every pass
    assert cluster.get(path)["status"]["phase"] == "Ready"
    assert _condition(cluster, path, "Degraded")["status"] == "False"  # type: ignore[index]
    before = len(cluster.requests())
    assert run(cluster, kube_client, path).events == []
    assert cluster.writes(since=before) == []
    # Moved to the field: the warning's condition goes, the flag is rendered once.
    move = {"spec": {"engine": {"extraArgs": [], "quantizeLmHead": False}}}
    assert cluster.patch(path, move).status_code == 200
    assert run(cluster, kube_client, path).error is None
    args = cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args.count("--no-quantize-lm-head") == 1
    assert _condition(cluster, path, "Deprecated") is None


def test_lm_head_flag_contradicting_the_field_is_degraded(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    engine = {"quantization": "int8", "quantizeLmHead": False, "extraArgs": ["--quantize-lm-head"]}
    path = create_llmd("gpu", engine=engine)
    result = run(cluster, kube_client, path)
    message = (
        "engine.extraArgs: --quantize-lm-head contradicts engine.quantizeLmHead false; "
        "remove the flag (deprecated: engine.quantizeLmHead replaces it)"
    )
    assert result.error is not None and str(result.error) == message
    assert cluster.get(DEPLOYMENT) is None
    degraded = _condition(cluster, path, "Degraded")
    assert degraded is not None
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        "InvalidSpec",
        message,
    )


def test_switching_modes_prunes_only_owned_children(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any, kserve_api_crds: Any
) -> None:
    for crd in kserve_api_crds:  # KServe's API is served (else: Degraded, APINotInstalled)
        cluster.apply_crd(crd)
    path = create_llmd("minimal-cpu")
    run(cluster, kube_client, path)
    deployment = "/apis/apps/v1/namespaces/ml/deployments/smollm2"
    assert cluster.get(deployment) is not None
    # A PVC-less resource going KServe: its Deployment and Service are deleted...
    assert cluster.patch(path, {"spec": {"serving": {"mode": "KServe"}}}).status_code == 200
    result = run(cluster, kube_client, path)
    assert result.applied == [
        "ServingRuntime/smollm2",
        "InferenceService/smollm2",
        "Deployment/smollm2",
        "Service/smollm2",
    ]
    assert [e.reason for e in result.events] == ["Created", "Created", "Deleted", "Deleted"]
    assert cluster.get(deployment) is None
    assert cluster.get("/api/v1/namespaces/ml/services/smollm2") is None
    # ...but a same-named object it does not own is never touched.
    cluster.post(
        "/apis/apps/v1/namespaces/ml/deployments",
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "smollm2"}},
    )
    before = len(cluster.requests())
    assert run(cluster, kube_client, path).applied == []
    assert cluster.writes(since=before) == [] and cluster.get(deployment) is not None


class _NotFoundOn:
    """The operator's client, except that applying `kind` answers 404 (its namespace is
    being deleted, say)."""

    def __init__(self, client: HttpKubeClient, kind: str) -> None:
        self.client, self.kind = client, kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj["kind"] == self.kind:
            raise ApiError(404, 'namespaces "ml" not found')
        return self.client.apply(obj)


@pytest.mark.parametrize("kind", ["Service", "Deployment"])
def test_a_404_for_a_built_in_kind_is_not_an_api_to_install(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any, kind: str
) -> None:
    """Only kinds an add-on installs (LeaderWorkerSet, KServe, KEDA) read a 404 as
    APINotInstalled; for a Deployment or Service it propagates (the caller retries)."""
    path = create_llmd("gpu")
    body = cluster.get(path)
    with pytest.raises(ApiError) as raised:
        reconcile(_NotFoundOn(kube_client, kind), body)  # type: ignore[arg-type]
    assert raised.value.status == 404
    assert "conditions" not in (cluster.get(path).get("status") or {})
