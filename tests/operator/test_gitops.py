"""GitOps: applying the same manifest again is a no-op, and the autoscaler is never a diff.

The manifest is applied the way `kubectl apply --server-side` (or Argo CD / Flux) does:
server-side apply under the test's own field manager. The real kopf operator runs against
the API emulator; every request it makes is on record, and the tests wait for its own log
of a finished pass (or of kopf's finished cycle) before deciding what it did not do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CR = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments/qwen-autoscaled"
LLMD, KOPF_CR = "ml/qwen-autoscaled", "LLMDeployment/ml/qwen-autoscaled"  # in the operator's log
DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/qwen-autoscaled"
HPA = "/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/qwen-autoscaled"
CHILDREN = [
    DEPLOYMENT,
    HPA,
    "/api/v1/namespaces/ml/services/qwen-autoscaled",
    "/api/v1/namespaces/ml/persistentvolumeclaims/qwen-autoscaled-cache",
]


def manifest() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "examples" / "autoscaling.yaml").read_text()))


def server_side_apply(cluster: Any, obj: dict[str, Any]) -> None:
    response = cluster.http.patch(
        CR,
        params={"fieldManager": "argocd-controller", "force": "true"},
        json=obj,
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    assert response.status_code in (200, 201), response.text


def operator_writes(cluster: Any, since: int) -> list[Any]:
    return [
        r
        for r in cluster.requests()[since:]
        if r.method in ("POST", "PUT", "PATCH", "DELETE")
        and r.headers.get("User-Agent") != "pinnace-tests"
    ]


def versions(cluster: Any) -> dict[str, str]:
    return {path: cluster.get(path)["metadata"]["resourceVersion"] for path in CHILDREN}


def test_applying_the_same_manifest_twice_changes_nothing(
    cluster: Any, start_operator: Any
) -> None:
    cluster.apply_crd()
    start_operator()
    server_side_apply(cluster, manifest())
    cluster.wait_for(lambda: all(cluster.get(path) for path in CHILDREN))
    cluster.wait_for(lambda: "status" in cluster.get(CR))
    cluster.kopf_finished(KOPF_CR, after=0)  # the creation handled, kopf's bookkeeping too
    version, children = cluster.get(CR)["metadata"]["resourceVersion"], versions(cluster)

    server_side_apply(cluster, manifest())  # the next sync of an unchanged repo

    # A no-op for the API server: the same resourceVersion, so no watch event, nothing for
    # the operator to react to; nothing the operator wrote shows up as a change either.
    cr = cluster.get(CR)
    assert cr["metadata"]["resourceVersion"] == version
    assert versions(cluster) == children  # no second update to any child
    assert cr["spec"] == manifest()["spec"] and cr["metadata"]["generation"] == 1


def test_what_the_autoscaler_does_never_shows_up_as_a_diff(
    cluster: Any, start_operator: Any
) -> None:
    cluster.apply_crd()
    start_operator()
    server_side_apply(cluster, manifest())
    dep = cluster.wait_for(lambda: cluster.get(DEPLOYMENT))
    assert "replicas" not in dep["spec"]  # the operator leaves the count to the HPA
    assert cluster.wait_for(lambda: cluster.get(HPA))["spec"]["maxReplicas"] == 8
    cluster.kopf_finished(KOPF_CR, after=0)  # the creation handled, kopf's bookkeeping too
    before = cluster.seq()

    # The HPA scales the Deployment up (through the Deployment, never the LLMDeployment).
    scaled = {"spec": {"replicas": 5}}
    assert cluster.patch(DEPLOYMENT, scaled).status_code == 200
    generation = cluster.get(DEPLOYMENT)["metadata"]["generation"]
    status = {"observedGeneration": generation, "replicas": 5, "readyReplicas": 5}
    reported = cluster.seq()
    assert cluster.patch(DEPLOYMENT + "/status", {"status": {**status, "updatedReplicas": 5}})
    cluster.reconciled(LLMD, after=reported)  # and so every pass before it
    cr = cluster.get(CR)
    cluster.wait_for(lambda: cluster.events("Ready"))  # posted by kopf after the pass

    assert cr["status"]["phase"] == "Ready" and cr["status"]["replicas"] == 5
    assert cluster.get(DEPLOYMENT)["spec"]["replicas"] == 5  # not put back by the operator
    writes = {r.url.path for r in operator_writes(cluster, before)}
    # Only the status subresource was written (and an Event: it became Ready): no child,
    # and never the spec.
    assert writes == {CR + "/status", "/api/v1/namespaces/ml/events"}
    assert cr["spec"] == manifest()["spec"] and cr["metadata"]["generation"] == 1

    # Scaled to zero (KEDA-style): a phase, not an error, and still no diff.
    before = cluster.seq()
    assert cluster.patch(DEPLOYMENT, {"spec": {"replicas": 0}}).status_code == 200
    zero = {"replicas": 0, "readyReplicas": 0, "updatedReplicas": 0}
    reported = cluster.seq()
    cluster.patch(DEPLOYMENT + "/status", {"status": zero})
    cluster.reconciled(LLMD, after=reported)
    cr = cluster.get(CR)
    cluster.wait_for(lambda: cluster.events("ScaledToZero"))
    writes = {r.url.path for r in operator_writes(cluster, before)}
    assert writes == {CR + "/status", "/api/v1/namespaces/ml/events"}  # a ScaledToZero Event
    ready = next(c for c in cr["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == ("ScaledToZero", "scaled to zero")


def test_dropping_autoscaling_deletes_the_hpa_and_fixes_the_count(
    cluster: Any, start_operator: Any
) -> None:
    cluster.apply_crd()
    operator = start_operator()
    server_side_apply(cluster, manifest())
    cluster.wait_for(lambda: cluster.get(HPA))
    edited = manifest()
    del edited["spec"]["autoscaling"]
    edited["spec"]["replicas"] = 2
    server_side_apply(cluster, edited)  # SSA drops autoscaling: this manager no longer sets it
    cluster.wait_for(lambda: cluster.get(HPA) is None)
    dep = cluster.wait_for(
        lambda: (d := cluster.get(DEPLOYMENT)) and d["spec"].get("replicas") == 2 and d
    )
    assert dep["metadata"]["ownerReferences"][0]["name"] == "qwen-autoscaled"
    assert "autoscaling" not in cluster.get(CR)["spec"] and operator.alive
