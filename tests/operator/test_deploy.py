"""deploy/: RBAC without wildcards covering every request the operator makes; a locked-down pod."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml

from pinnace.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def rules() -> list[dict[str, Any]]:
    [role] = [d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole"]
    return list(role["rules"])


@pytest.mark.parametrize("name", ["rbac.yaml", "operator.yaml"])
def test_manifests_are_valid_kubernetes(name: str) -> None:
    for doc in docs(name):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_peering_object_is_the_one_the_deployed_operator_elects_its_leader_through(
    schema_errors: Any,
) -> None:
    """deploy/operator.yaml's command, read by the real CLI parser, names the peering object
    kopf will look for; deploy/peering.yaml must be that object, of the scope that command
    serves, and valid for kopf's CRD (crds/): else the replicas would not elect a leader."""
    [dep] = [d for d in docs("operator.yaml") if d["kind"] == "Deployment"]
    [container] = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert args.all_namespaces and not args.standalone  # cluster-wide, with leader election
    [peering] = docs("peering.yaml")
    assert (peering["kind"], peering["metadata"]["name"]) == ("ClusterKopfPeering", args.peering)
    assert "namespace" not in peering["metadata"]  # cluster-scoped, like its CRD
    crds = yaml.safe_load_all((REPO / "crds" / "kopf.dev_peerings.yaml").read_text())
    [crd] = [c for c in crds if c["spec"]["names"]["kind"] == peering["kind"]]
    assert crd["spec"]["scope"] == "Cluster"
    assert schema_errors(crd, peering) == []
    assert dep["spec"]["replicas"] > 1  # what the election is for


def test_rbac_has_no_wildcards_and_binds_the_service_account() -> None:
    for rule in rules():
        for key in ("apiGroups", "resources", "verbs"):
            assert rule[key] and "*" not in rule[key] and not any("*" in v for v in rule[key])
        assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "patch", "delete"}
    by_kind = {d["kind"]: d for d in docs("rbac.yaml")}
    account = by_kind["ServiceAccount"]["metadata"]
    binding = by_kind["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    verbs_of: dict[str, set[str]] = {}
    for rule in rules():
        for resource in rule["resources"]:
            verbs_of.setdefault(resource, set()).update(rule["verbs"])
    # Pods are only found and watched (to hot-load adapters over HTTP), never written or
    # exec'd into, except their adapter readiness gate's condition; a Secret is only read
    # (the runtime's API key); configmaps never.
    assert verbs_of["pods"] == {"list", "watch"} and verbs_of["secrets"] == {"get"}
    assert verbs_of["pods/status"] == {"patch"}
    assert not verbs_of.keys() & {"configmaps", "pods/exec"}
    # Deleting is for stateless children it prunes; never the weights cache or user objects.
    deletable = {r for r, verbs in verbs_of.items() if "delete" in verbs}
    assert deletable == {
        "deployments",
        "leaderworkersets",
        "services",
        "horizontalpodautoscalers",
        "scaledobjects",
        "inferenceservices",
        "servingruntimes",
        "poddisruptionbudgets",
        "networkpolicies",
        "jobs",
    }


def test_operator_pod_runs_non_root_with_a_read_only_root() -> None:
    [dep] = [d for d in docs("operator.yaml") if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    [sa] = [d for d in docs("rbac.yaml") if d["kind"] == "ServiceAccount"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    [c] = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["command"][:2] == ["pinnace", "operator"] and "--all-namespaces" in c["command"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def verbs(request: Any) -> set[str]:
    """The RBAC verbs the API server checks for a request."""
    if request.method == "GET":
        if request.params.get("watch") == "true":
            return {"watch"}
        return {"get"} if request.name else {"list"}
    if request.method == "PATCH" and request.action == kmock.action.CREATE:
        return {"patch", "create"}  # server-side apply of an absent object creates it
    return {
        {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method]
    }


def used_permissions(cluster: Any) -> set[tuple[str, str, str]]:
    used = set()
    for request in cluster.requests():
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        if agent == "pinnace-tests" or request.resource is None or not request.resource.plural:
            continue  # the test itself, or discovery (allowed to every authenticated user)
        resource = request.resource.plural
        if request.subresource:
            resource += f"/{request.subresource}"
        used |= {(request.resource.group, resource, v) for v in verbs(request)}
    return used


# Grants the emulated scenario cannot exercise: kopf's cluster scanning and peering (the
# test operator runs standalone with scanning off, as kmock cannot list namespaces).
NOT_EXERCISED = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    *(
        ("kopf.dev", plural, verb)
        for plural in ("clusterkopfpeerings", "kopfpeerings")
        for verb in ("get", "list", "watch", "patch")
    ),
}


def test_rbac_is_exactly_what_the_operator_uses(
    cluster: Any,
    create_llmd: Any,
    start_operator: Any,
    kserve_api_crds: list[dict[str, Any]],
    keda_crd: dict[str, Any],
    lws_crd: dict[str, Any],
    runtime_pods: Any,
) -> None:
    for crd in [*kserve_api_crds, keda_crd, lws_crd]:
        cluster.apply_crd(crd)
    start_operator()  # after the CRDs: kopf discovers InferenceServices once, at start
    base = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"
    # PVC + Service + Deployment + PodDisruptionBudget (2 replicas) + NetworkPolicy
    gpu = create_llmd("gpu", networkPolicy={"allowFrom": [{"podLabels": {"app": "gateway"}}]})
    bad = create_llmd("minimal-cpu", engine={"extraArgs": ["--port", "1"]})  # Degraded
    hpa = create_llmd("autoscaling")  # + HorizontalPodAutoscaler
    keda = create_llmd("autoscaling-keda")  # + ScaledObject
    isvc = create_llmd("kserve")  # ServingRuntime + InferenceService
    group = create_llmd("multi-node")  # LeaderWorkerSet
    # LoRA: fetch Jobs, a runtime pod to hot-load on, the API key Secret to call it with.
    key = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bot-key"}}
    cluster.post("/api/v1/namespaces/ml/secrets", {**key, "data": {"api-key": "a2V5"}})
    lora = create_llmd("adapters", serving={"apiKeySecretRef": {"name": "bot-key"}})
    wait = Waiter(cluster)
    wait.exists("/apis/apps/v1/namespaces/ml/deployments/support-bot")
    bot = runtime_pods.start(
        "/apis/apps/v1/namespaces/ml/deployments/support-bot", "support-bot-0", api_key="key"
    )
    wait.until(lambda: bot.calls_to("/v1/models"))
    cluster.patch(lora, {"spec": {"adapters": [{"name": "tone", "uri": "file:///adapters/t"}]}})
    wait.until(lambda: cluster.get("/apis/batch/v1/namespaces/ml/jobs")["items"] == [])
    wait.until(lambda: bot.calls_to("/v1/load_lora_adapter"))
    wait.exists("/apis/apps/v1/namespaces/ml/deployments/qwen-chat")
    wait.exists("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/qwen-chat")
    wait.exists("/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/qwen-autoscaled")
    wait.exists("/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/smollm2-keda")
    isvc_path = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/qwen-kserve"
    wait.exists(isvc_path)
    lws_path = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ml/leaderworkersets/llama-405b"
    wait.exists(lws_path)
    wait.until(lambda: "status" in (cluster.get(bad) or {}))

    # Updates patch children; dropping autoscaling deletes the autoscalers, turning off the
    # PDB and the NetworkPolicy deletes them.
    off = {"networkPolicy": None, "disruptionBudget": {"enabled": False}}
    cluster.patch(gpu, {"spec": {"replicas": 2, "engine": {"dtype": "float16"}, **off}})
    cluster.patch(hpa, {"spec": {"autoscaling": {"maxReplicas": 6}}})
    cluster.patch(isvc, {"spec": {"autoscaling": {"maxReplicas": 6}, "engine": {"maxNumSeqs": 8}}})
    wait.until(lambda: cluster.get(isvc_path)["spec"]["predictor"]["maxReplicas"] == 6)
    cluster.patch(hpa, {"spec": {"autoscaling": None}})
    cluster.patch(keda, {"spec": {"autoscaling": None}})
    wait.gone("/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/qwen-autoscaled")
    wait.gone("/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/smollm2-keda")
    wait.gone("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/qwen-chat")
    wait.gone("/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/qwen-chat")
    # KServe reports ready (a watched event); switching modes deletes the other mode's children.
    ready = {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://qwen.ml"}
    cluster.patch(isvc_path + "/status", {"status": ready})
    wait.until(lambda: cluster.get(isvc)["status"].get("url") == "http://qwen.ml")
    cluster.patch(keda, {"spec": {"serving": {"mode": "KServe"}}})
    wait.gone("/apis/apps/v1/namespaces/ml/deployments/smollm2-keda")
    cluster.patch(isvc, {"spec": {"serving": {"mode": "Deployment", "kserve": None}}})
    wait.gone(isvc_path)
    # Fitting one pod again: the LeaderWorkerSet goes, a Deployment comes.
    one_pod = {"engine": {"pipelineParallelSize": 1}, "model": {"parameterCount": "70B"}}
    cluster.patch(group, {"spec": one_pod})
    wait.gone(lws_path)
    deleted = cluster.seq()
    cluster.http.delete(f"{base}/qwen-chat")
    cluster.reconciled("ml/qwen-chat", after=deleted)  # what it does about a deletion

    used = used_permissions(cluster)
    granted = {
        (g, r, v)
        for rule in rules()
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert used <= granted, sorted(used - granted)  # nothing it needs is missing
    assert granted - NOT_EXERCISED <= used, sorted(granted - NOT_EXERCISED - used)  # no extras


class Waiter:
    # One deadline for the whole scenario, not a sleep: a passing run takes what it takes.
    # Roomy because on a loaded 2-core machine the scenario alone has taken over 45 s.
    def __init__(self, cluster: Any, timeout: float = 180.0) -> None:
        self.cluster, self.deadline = cluster, time.monotonic() + timeout

    def until(self, predicate: Any) -> None:
        while not predicate():
            assert time.monotonic() < self.deadline, "timed out"
            time.sleep(0.05)

    def exists(self, path: str) -> None:
        self.until(lambda: self.cluster.get(path) is not None)

    def gone(self, path: str) -> None:
        self.until(lambda: self.cluster.get(path) is None)
