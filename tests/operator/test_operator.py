"""The real kopf operator against the API emulator: the lifecycle of an LLMDeployment."""

from __future__ import annotations

import time
from typing import Any

from pinnace.operator import names

BASE = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"
DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/qwen-chat"
SERVICE = "/api/v1/namespaces/ml/services/qwen-chat"


def args_of(deployment: dict[str, Any]) -> list[str]:
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


def pod_hash(deployment: dict[str, Any]) -> str:
    return str(
        deployment["spec"]["template"]["metadata"]["annotations"][names.ANNOTATION_POD_SPEC_HASH]
    )


def condition(cr: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in cr["status"]["conditions"] if c["type"] == type_)


def test_lifecycle_create_update_ready_delete(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    operator = start_operator()
    path = create_llmd("gpu")
    cr = cluster.get(path)

    # Create: children with ownerReferences and the flags from the spec.
    dep = cluster.wait_for(lambda: cluster.get(DEPLOYMENT))
    service = cluster.wait_for(lambda: cluster.get(SERVICE))
    for child in (dep, service):
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "LLMDeployment",
            cr["metadata"]["uid"],
            True,
        )
    args = args_of(dep)
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    first_hash = pod_hash(dep)

    # Scale: the Deployment is patched, the pod template (and its hash) is not.
    assert cluster.patch(path, {"spec": {"replicas": 3}}).status_code == 200
    dep = cluster.wait_for(
        lambda: (d := cluster.get(DEPLOYMENT)) and d["spec"]["replicas"] == 3 and d
    )
    assert pod_hash(dep) == first_hash
    # An engine change rolls the pods: the hash moves with the new flags.
    assert cluster.patch(path, {"spec": {"engine": {"dtype": "float16"}}}).status_code == 200
    dep = cluster.wait_for(lambda: (d := cluster.get(DEPLOYMENT)) and "float16" in args_of(d) and d)
    assert pod_hash(dep) != first_hash
    assert cluster.get(path)["metadata"]["generation"] == 3

    # The Deployment controller reports ready pods: the resource becomes Ready.
    ready = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": 3,
        "readyReplicas": 3,
        "updatedReplicas": 3,
    }
    assert cluster.patch(DEPLOYMENT + "/status", {"status": ready}).status_code == 200
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Ready" and c
    )
    assert cr["status"]["endpoint"] == "http://qwen-chat.ml.svc.cluster.local:8000/v1"
    assert cr["status"]["observedGeneration"] == 3 and cr["status"]["readyReplicas"] == 3
    assert condition(cr, "Ready")["status"] == "True"
    assert cr["spec"]["engine"]["dtype"] == "float16"  # the operator never rewrites the spec
    assert "effective" in cr["status"] and "--dtype" in cr["status"]["effective"]["args"]
    events = cluster.wait_for(lambda: cluster.events("Ready"))
    assert events[0]["involvedObject"]["name"] == "qwen-chat"

    # Delete: Kubernetes garbage-collects the children; the operator does not bring them back.
    deleted = cluster.seq()
    assert cluster.http.delete(path).status_code == 200
    cluster.wait_for(lambda: cluster.get(DEPLOYMENT) is None and cluster.get(SERVICE) is None)
    cluster.reconciled("ml/qwen-chat", after=deleted)  # the children's deletion: a pass
    assert cluster.pass_writes("ml/qwen-chat", after=deleted) == []
    assert cluster.get(DEPLOYMENT) is None and cluster.get(path) is None
    assert operator.alive


def test_invalid_resource_is_degraded_and_the_operator_carries_on(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    operator = start_operator()
    bad = create_llmd("gpu", adapters=[{"name": "qwen-chat", "uri": "hf://acme/lora"}])
    cr = cluster.wait_for(
        lambda: (c := cluster.get(bad)) and c.get("status", {}).get("phase") == "Degraded" and c
    )
    degraded = condition(cr, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert degraded["message"] == "adapters: name 'qwen-chat' clashes with the served model name"
    assert cluster.get(DEPLOYMENT) is None
    # kopf posts events from a queue of its own, after the handler: wait for it.
    cluster.wait_for(lambda: any(e["type"] == "Warning" for e in cluster.events("InvalidSpec")))
    # PermanentError: no retry against a spec only the user can fix. The test operator
    # retries failures after 0.2 s, doubling (kopf's backoff for a crash: 0.2 s flat), so a
    # TemporaryError here would retry 3 times in these 2 s, a crash about 10 times.
    handled = cluster.seq()
    time.sleep(2.0)
    assert cluster.passes_started("ml/qwen-chat", after=handled) == 0
    # Still serving other resources, and the fixed resource recovers.
    create_llmd("minimal-cpu")
    cluster.wait_for(lambda: cluster.get("/apis/apps/v1/namespaces/ml/deployments/smollm2"))
    assert cluster.patch(bad, {"spec": {"adapters": None}}).status_code == 200
    cr = cluster.wait_for(
        lambda: (c := cluster.get(bad)) and condition(c, "Degraded")["status"] == "False" and c
    )
    assert cluster.get(DEPLOYMENT) is not None and operator.alive


def test_second_reconcile_with_no_change_makes_no_write(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    operator = start_operator()
    path = create_llmd("gpu")
    cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Pending"
    )

    # Trigger 1: an event on the owned Deployment (a label someone else added): the pass
    # it causes reads everything afresh and finds nothing to change.
    label = {"metadata": {"labels": {"team": "ml"}}}
    labelled = cluster.seq()
    assert cluster.patch(DEPLOYMENT, label).status_code == 200
    cluster.reconciled("ml/qwen-chat", after=labelled)
    assert cluster.pass_writes("ml/qwen-chat", after=labelled) == []

    # Trigger 2: an operator restart (kopf resumes every resource): nothing is written,
    # by our passes or by kopf's bookkeeping, up to the end of kopf's resume cycle.
    operator.stop()
    restarted = cluster.seq()
    start_operator()
    cluster.reconciled("ml/qwen-chat", after=restarted)
    cluster.kopf_finished("LLMDeployment/ml/qwen-chat", after=restarted)
    assert cluster.writes(since=restarted) == []


def test_an_api_failure_is_retried_with_backoff_neither_dropped_nor_in_a_storm(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    # The API server refuses the Deployment (503) for a while: each pass fails there and
    # kopf retries it after the operator's backoff, 0.2 s doubling in the test operator.
    cluster.api.unavailable.add(DEPLOYMENT)
    operator = start_operator()
    created = cluster.seq()
    create_llmd("gpu")

    def attempts() -> int:
        return cluster.writes(since=created).count(f"PATCH {DEPLOYMENT}")

    cluster.wait_for(lambda: attempts() >= 1)
    time.sleep(2.0)
    # First try, then retries at about +0.2, +0.6, +1.4 s (+3.0 is past the window): a
    # lost retry would show 0, a fixed 0.2 s backoff about 9, no backoff hundreds.
    retries = attempts() - 1
    assert 1 <= retries <= 5, retries

    # The API server recovers: the next retry goes through.
    cluster.api.unavailable.clear()
    cluster.wait_for(lambda: cluster.get(DEPLOYMENT))
    assert operator.alive


def test_deprecated_lm_head_flag_serves_and_posts_one_warning(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    """An upgrade from before spec.engine.quantizeLmHead: the flag in extraArgs still rolls
    out (not Degraded), and the user is told once, by a Warning event, to move it."""
    start_operator()
    engine = {"quantization": "int8", "extraArgs": ["--no-quantize-lm-head"]}
    path = create_llmd("gpu", engine=engine)
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Pending" and c
    )
    assert condition(cr, "Degraded")["status"] == "False"
    assert condition(cr, "Deprecated")["reason"] == "DeprecatedSpelling"
    assert args_of(cluster.get(DEPLOYMENT)).count("--no-quantize-lm-head") == 1
    warned = cluster.wait_for(lambda: cluster.events("Deprecated"))
    assert [e["type"] for e in warned] == ["Warning"]
    assert "set engine.quantizeLmHead: false instead" in warned[0]["message"]
