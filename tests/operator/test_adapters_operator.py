"""Multi-LoRA, operator side: the real kopf operator against the API emulator, with runtime
pods that are real HTTP servers on 127.0.0.1 (`runtime_pods`, conftest.py).

Changing `spec.adapters` loads and unloads adapters on the ready pods without touching
the Deployment; a restarted pod gets them back; failures land in status, not in a loop.
"""

from __future__ import annotations

import base64
from typing import Any

from pinnace.operator import names

BASE = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"
CR = f"{BASE}/chat"
DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/chat"
JOBS = "/apis/batch/v1/namespaces/ml/jobs"
API_KEY = "s3cret-key"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def create_chat(cluster: Any, adapters: list[dict[str, str]], **spec: Any) -> None:
    secret = {"api-key": base64.b64encode(API_KEY.encode()).decode()}
    cluster.post(
        "/api/v1/namespaces/ml/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-key"}, "data": secret},
    )
    body = {
        "apiVersion": "pinnace.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {
            "model": {"uri": "file:///models/base", "servedName": "base"},
            "serving": {"apiKeySecretRef": {"name": "chat-key"}},
            "adapters": adapters,
            **spec,
        },
    }
    cluster.post(BASE, body)


def adapters_status(cluster: Any) -> dict[str, dict[str, Any]]:
    status = (cluster.get(CR) or {}).get("status") or {}
    return {a["name"]: a for a in status.get("adapters") or []}


def condition(cluster: Any, type_: str) -> dict[str, Any] | None:
    conditions = ((cluster.get(CR) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def wait_condition(cluster: Any, type_: str, status: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        cond = condition(cluster, type_)
        return cond if cond is not None and cond["status"] == status else None

    return dict(cluster.wait_for(found))


def wait_states(cluster: Any, **expected: tuple[str, int]) -> dict[str, dict[str, Any]]:
    """Until status.adapters is exactly {name: (state, loadedReplicas)}."""

    def matches() -> dict[str, dict[str, Any]] | None:
        now = adapters_status(cluster)
        got = {n: (a["state"], a.get("loadedReplicas", 0)) for n, a in now.items()}
        return now if got == expected else None

    return dict(cluster.wait_for(matches))


def pod_hash(cluster: Any) -> str:
    dep = cluster.get(DEPLOYMENT)
    return str(dep["spec"]["template"]["metadata"]["annotations"][names.ANNOTATION_POD_SPEC_HASH])


def operator_writes_to(cluster: Any, path: str, since: int) -> list[str]:
    return [w for w in cluster.writes(since=since) if w.split(" ", 1)[1].startswith(path)]


def start_chat(
    cluster: Any,
    start_operator: Any,
    runtime_pods: Any,
    adapters: list[dict[str, str]],
    **spec: Any,
) -> tuple[Any, list[Any]]:
    """The operator, then `chat` with `adapters`, then its two ready pods chat-0 and chat-1."""
    cluster.apply_crd()  # before the operator starts: kopf resolves its resources once
    operator = start_operator()
    create_chat(cluster, adapters, **spec)
    cluster.wait_for(lambda: cluster.get(DEPLOYMENT))
    pods = [runtime_pods.start(DEPLOYMENT, f"chat-{i}", api_key=API_KEY) for i in range(2)]
    return operator, pods


def test_adapter_changes_hot_load_on_ready_pods_without_a_rollout(
    cluster: Any, start_operator: Any, runtime_pods: Any
) -> None:
    for name in ("sql", "support", "summarize"):
        runtime_pods.write_adapter(f"/adapters/{name}")
    adapters = [
        {"name": "sql", "uri": "file:///adapters/sql"},
        {"name": "support", "uri": "file:///adapters/support"},
    ]
    operator, pods = start_chat(cluster, start_operator, runtime_pods, adapters)
    wait_states(cluster, sql=("Loaded", 2), support=("Loaded", 2))
    for pod in pods:
        assert pod.loaded == {"sql": "/adapters/sql", "support": "/adapters/support"}
        assert pod.unauthorized == 0  # the key came from the Secret
    assert wait_condition(cluster, "AdaptersReady", "True")["reason"] == "Loaded"
    first_hash, since = pod_hash(cluster), len(cluster.requests())

    # Swap one adapter: unload it and load the new one on every pod; the rest stays put.
    patch = {"spec": {"adapters": [
        {"name": "sql", "uri": "file:///adapters/sql"},
        {"name": "summarize", "uri": "file:///adapters/summarize"},
    ]}}  # fmt: skip
    assert cluster.patch(CR, patch).status_code == 200
    wait_states(cluster, sql=("Loaded", 2), summarize=("Loaded", 2))
    for pod in pods:
        assert pod.loaded == {"sql": "/adapters/sql", "summarize": "/adapters/summarize"}
        assert [b["lora_name"] for b in pod.calls_to(LOAD)] == ["sql", "support", "summarize"]
        assert pod.calls_to(UNLOAD) == [{"lora_name": "support"}]
    # No rollout: the Deployment was not even written.
    assert pod_hash(cluster) == first_hash
    assert operator_writes_to(cluster, DEPLOYMENT, since) == []

    # A runtime restart comes back empty; the operator sees the pod turn ready and re-applies.
    fresh = runtime_pods.restart("ml", "chat-0")
    cluster.wait_for(
        lambda: fresh.loaded == {"sql": "/adapters/sql", "summarize": "/adapters/summarize"}
    )
    wait_states(cluster, sql=("Loaded", 2), summarize=("Loaded", 2))
    assert len(pods[1].calls_to(LOAD)) == 3  # the other pod was left alone

    # A pod that goes away is simply no longer counted.
    assert cluster.http.delete("/api/v1/namespaces/ml/pods/chat-1").status_code == 200
    wait_states(cluster, sql=("Loaded", 1), summarize=("Loaded", 1))
    assert operator.alive


def test_a_failing_adapter_is_reported_once_per_backoff_not_retried_in_a_storm(
    cluster: Any, start_operator: Any, runtime_pods: Any
) -> None:
    runtime_pods.write_adapter("/adapters/sql")
    sql = {"name": "sql", "uri": "file:///adapters/sql"}
    operator, pods = start_chat(cluster, start_operator, runtime_pods, [sql])
    wait_states(cluster, sql=("Loaded", 2))

    broken = {"name": "broken", "uri": "file:///adapters/missing"}
    patch = {"spec": {"adapters": [sql, broken]}}
    assert cluster.patch(CR, patch).status_code == 200
    states = wait_states(cluster, sql=("Loaded", 2), broken=("Failed", 0))
    assert states["broken"]["lastError"] == (
        "pod chat-0: POST /v1/load_lora_adapter: HTTP 404: "
        "Loading lora broken failed: No adapter found for /adapters/missing: not a folder."
    )
    failed = wait_condition(cluster, "AdaptersReady", "False")
    assert failed["reason"] == "AdapterFailed"
    assert failed["message"].startswith("broken: pod chat-0: POST /v1/load_lora_adapter: HTTP 404")
    warnings = cluster.wait_for(lambda: cluster.events("AdapterFailed"))
    assert warnings[0]["type"] == "Warning" and "broken" in warnings[0]["message"]

    # More passes (pod events) ask each pod what it has, but do not hammer the failing load.
    listed = [len(p.calls_to("/v1/models")) for p in pods]
    for i in range(3):
        label = {"metadata": {"labels": {"poke": str(i)}}}
        assert cluster.patch("/api/v1/namespaces/ml/pods/chat-0", label).status_code == 200
    cluster.wait_for(lambda: len(pods[0].calls_to("/v1/models")) >= listed[0] + 3)
    for pod in pods:
        assert [b["lora_name"] for b in pod.calls_to(LOAD)] == ["sql", "broken"]
    assert adapters_status(cluster)["broken"]["state"] == "Failed"

    # The fix (a path that exists) is tried at once, backoff or not.
    runtime_pods.write_adapter("/adapters/fixed")
    fixed = [sql, {**broken, "uri": "file:///adapters/fixed"}]
    assert cluster.patch(CR, {"spec": {"adapters": fixed}}).status_code == 200
    wait_states(cluster, sql=("Loaded", 2), broken=("Loaded", 2))
    assert "lastError" not in adapters_status(cluster)["broken"]
    wait_condition(cluster, "AdaptersReady", "True")
    assert operator.alive


def test_remote_adapter_is_fetched_by_a_job_then_hot_loaded(
    cluster: Any, start_operator: Any, runtime_pods: Any
) -> None:
    runtime_pods.write_adapter("/adapters/sql")
    local = {"name": "sql", "uri": "file:///adapters/sql"}
    cache = {"cache": {"claimName": "shared-cache"}}
    operator, pods = start_chat(cluster, start_operator, runtime_pods, [local], storage=cache)
    wait_states(cluster, sql=("Loaded", 2))
    first_hash, since = pod_hash(cluster), len(cluster.requests())

    remote = {"name": "returns", "uri": "hf://acme/returns-lora"}
    assert cluster.patch(CR, {"spec": {"adapters": [local, remote]}}).status_code == 200
    wait_states(cluster, sql=("Loaded", 2), returns=("Fetching", 0))
    [job] = cluster.wait_for(lambda: cluster.get(JOBS)["items"])
    [fetch] = job["spec"]["template"]["spec"]["containers"]
    assert fetch["command"][:3] == ["hf", "download", "acme/returns-lora"]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "shared-cache"
    }
    assert all(not p.calls_to(LOAD)[1:] for p in pods)  # nothing to load before the files exist

    # The Job wrote the files into the shared cache and completed: every pod loads them.
    runtime_pods.write_adapter("/cache/adapters/hf/acme/returns-lora")
    done = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    job_path = f"{JOBS}/{job['metadata']['name']}"
    assert cluster.patch(f"{job_path}/status", {"status": done}).status_code == 200
    wait_states(cluster, sql=("Loaded", 2), returns=("Loaded", 2))
    for pod in pods:
        assert pod.loaded["returns"] == "/cache/adapters/hf/acme/returns-lora"

    # A fetch that fails for good is the adapter's error.
    gone = {"name": "gone", "uri": "hf://acme/deleted-lora"}
    assert cluster.patch(CR, {"spec": {"adapters": [local, remote, gone]}}).status_code == 200
    [gone_job] = cluster.wait_for(
        lambda: [
            j for j in cluster.get(JOBS)["items"] if "deleted-lora" in str(j["spec"]["template"])
        ]
    )
    failed = {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ]
    }
    gone_path = f"{JOBS}/{gone_job['metadata']['name']}"
    assert cluster.patch(f"{gone_path}/status", {"status": failed}).status_code == 200
    states = wait_states(cluster, sql=("Loaded", 2), returns=("Loaded", 2), gone=("Failed", 0))
    assert states["gone"]["lastError"] == (
        f"fetch Job {gone_job['metadata']['name']} failed: "
        "Job has reached the specified backoff limit"
    )

    # Dropping remote adapters unloads them and deletes their Jobs; the pods never rolled.
    assert cluster.patch(CR, {"spec": {"adapters": [local]}}).status_code == 200
    wait_states(cluster, sql=("Loaded", 2))
    cluster.wait_for(lambda: cluster.get(JOBS)["items"] == [])
    for pod in pods:
        assert pod.loaded == {"sql": "/adapters/sql"}
    assert pod_hash(cluster) == first_hash
    assert operator_writes_to(cluster, DEPLOYMENT, since) == []
    assert operator.alive


def pod_ready(cluster: Any, name: str) -> bool:
    """The kubelet's rule: every container ready and every readiness gate's condition True."""
    pod = cluster.get(f"/api/v1/namespaces/ml/pods/{name}")
    status = pod.get("status") or {}
    containers = [c.get("ready") for c in status.get("containerStatuses") or []]
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
    return bool(containers) and all(containers) and all(conditions.get(g) == "True" for g in gates)


def gate_condition(cluster: Any, name: str) -> dict[str, Any]:
    pod = cluster.get(f"/api/v1/namespaces/ml/pods/{name}")
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == names.ADAPTERS_GATE), {})


def test_readiness_gate_holds_pods_until_their_adapters_load(
    cluster: Any, start_operator: Any, runtime_pods: Any
) -> None:
    """A pod whose container is ready is still not Ready (no Service traffic, so no 404 for
    an adapter the resource declares) until the operator has loaded its adapters."""
    not_yet = {"name": "sql", "uri": "file:///adapters/sql-v1"}  # no files there
    operator, pods = start_chat(cluster, start_operator, runtime_pods, [not_yet])
    template = cluster.get(DEPLOYMENT)["spec"]["template"]["spec"]
    assert template["readinessGates"] == [{"conditionType": names.ADAPTERS_GATE}]
    wait_states(cluster, sql=("Failed", 0))
    for i in range(2):
        assert not pod_ready(cluster, f"chat-{i}")  # containers ready, the gate closed
        assert gate_condition(cluster, f"chat-{i}").get("status") != "True"

    runtime_pods.write_adapter("/adapters/sql-v2")
    fixed = {"spec": {"adapters": [{"name": "sql", "uri": "file:///adapters/sql-v2"}]}}
    assert cluster.patch(CR, fixed).status_code == 200
    cluster.wait_for(lambda: all(pod_ready(cluster, f"chat-{i}") for i in range(2)))
    for pod in pods:  # loaded before the gate opened
        assert pod.loaded == {"sql": "/adapters/sql-v2"}
    assert gate_condition(cluster, "chat-0")["reason"] == "AdaptersLoaded"

    # A runtime restart comes back empty: the gate is granted again for the new start.
    fresh = runtime_pods.restart("ml", "chat-0")
    cluster.wait_for(lambda: "runtime start 1" in gate_condition(cluster, "chat-0")["message"])
    assert fresh.loaded == {"sql": "/adapters/sql-v2"} and pod_ready(cluster, "chat-0")
    # Quiet once converged: another pass writes nothing to the pods.
    since = cluster.seq()
    assert cluster.patch(CR, {"metadata": {"labels": {"touch": "1"}}}).status_code == 200
    cluster.reconciled("ml/chat", after=since)
    assert [w for w in cluster.pass_writes("ml/chat", after=since) if "/pods/" in w] == []
    assert operator.alive


def test_gate_closes_for_a_restarted_runtime_until_a_pass_reloads_it() -> None:
    from pinnace.operator.adapter_sync import PodOutcome, gate_changes

    def pod(restarts: int, message: str) -> dict[str, Any]:
        gate = {"type": names.ADAPTERS_GATE, "status": "True", "message": message}
        container = {"name": "runtime", "ready": False, "restartCount": restarts}
        return {
            "metadata": {"name": "p"},
            "spec": {"readinessGates": [{"conditionType": names.ADAPTERS_GATE}]},
            "status": {"containerStatuses": [container], "conditions": [gate]},
        }

    granted = "declared adapters loaded (runtime start 0)"
    # Same runtime start, adapter added later: the serving pod stays Ready.
    assert gate_changes([pod(0, granted)], [], {"new": "/a"}) == []
    # Restarted (empty): closed until reloaded.
    [(name, closed)] = gate_changes([pod(1, granted)], [], {"sql": "/a"})
    assert (name, closed["status"], closed["reason"]) == ("p", "False", "RuntimeRestarted")
    reloaded = PodOutcome("p", loaded={"sql"})
    [(_, opened)] = gate_changes([pod(1, granted)], [reloaded], {"sql": "/a", "fetching": None})
    assert opened["status"] == "True" and "runtime start 1" in opened["message"]
