"""KServe mode reports `status.adapters` too: its predictor pods start with the adapters
(`--lora-modules`), and the operator asks each ready one what it serves (read only)."""

from __future__ import annotations

from typing import Any

from pinnace.operator import names
from pinnace.operator.adapter_sync import AdapterSync
from pinnace.operator.client import HttpKubeClient
from pinnace.operator.reconcile import reconcile
from pinnace.operator.runtime_client import HttpRuntimeClient

RUNTIME = "/apis/serving.kserve.io/v1alpha1/namespaces/ml/servingruntimes/support-bot"


def states(status: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {a["name"]: (a["state"], a.get("loadedReplicas", 0)) for a in status["adapters"]}


def test_kserve_adapter_status_follows_the_predictor_pods(
    cluster: Any,
    kube_client: HttpKubeClient,
    create_llmd: Any,
    kserve_api_crds: list[dict[str, Any]],
    runtime_pods: Any,
) -> None:
    for crd in kserve_api_crds:
        cluster.apply_crd(crd)
    path = create_llmd(
        "adapters",
        model={"uri": "s3://models/llama-3.2-3b-instruct"},
        storage={},
        serving={"mode": "KServe"},
    )
    sync = AdapterSync(HttpRuntimeClient())
    status = reconcile(kube_client, cluster.get(path), adapters=sync).status
    # No predictor pod yet: declared, not served anywhere.
    assert states(status) == {
        "billing": ("Pending", 0),
        "returns": ("Pending", 0),
        "tone": ("Pending", 0),
    }
    adapters_ready = next(c for c in status["conditions"] if c["type"] == "AdaptersReady")
    assert adapters_ready["status"] == "False"

    # KServe's predictor pod, started from the ServingRuntime with --lora-modules.
    [container] = cluster.get(RUNTIME)["spec"]["containers"]
    runtime = runtime_pods.serve(base="support-bot")
    runtime.loaded.update({n: f"/mnt/models/adapters/{n}" for n in ("billing", "returns", "tone")})
    container = {
        **container,
        "ports": [{"name": names.KSERVE_PORT_NAME, "containerPort": runtime.port}],
    }
    labels = {names.LABEL_KSERVE_ISVC: "support-bot"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "support-bot-predictor-0", "labels": labels},
    }
    cluster.post("/api/v1/namespaces/ml/pods", {**pod, "spec": {"containers": [container]}})
    ready = {"name": names.KSERVE_CONTAINER_NAME, "ready": True, "restartCount": 0}
    pod_status = {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [ready]}
    cluster.patch(
        "/api/v1/namespaces/ml/pods/support-bot-predictor-0/status", {"status": pod_status}
    )

    status = reconcile(kube_client, cluster.get(path), adapters=sync).status
    assert states(status) == {
        "billing": ("Loaded", 1),
        "returns": ("Loaded", 1),
        "tone": ("Loaded", 1),
    }
    assert next(c for c in status["conditions"] if c["type"] == "AdaptersReady")["status"] == "True"
    assert runtime.calls_to("/v1/load_lora_adapter") == []  # read only: KServe owns the pods

    runtime.loaded.pop("tone")  # e.g. a pod that has not got it
    status = reconcile(kube_client, cluster.get(path), adapters=sync).status
    assert states(status)["tone"] == ("Pending", 0)
