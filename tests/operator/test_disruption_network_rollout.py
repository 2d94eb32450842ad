"""PodDisruptionBudget, NetworkPolicy and rollout strategy: rendered as asked, valid for
Kubernetes (kubernetes-validate strict), applied by reconcile and pruned when turned off."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.operator.client import HttpKubeClient
from pinnace.operator.llmdeployment import LLMDeployment, parse_llmdeployment
from pinnace.operator.reconcile import reconcile
from pinnace.operator.render import (
    render_all,
    render_deployment,
    render_disruption_budget,
    render_network_policy,
)

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()
PDB = "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/qwen-chat"
NETPOL = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/qwen-chat"


def example(name: str, **spec: Any) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec))
    return parse_llmdeployment(body)


def valid(obj: dict[str, Any] | None) -> dict[str, Any]:
    assert obj is not None
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return obj


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("gpu", {}, 1),  # two replicas: on by default
        ("minimal-cpu", {}, None),  # one replica: none, drains are not blocked
        ("minimal-cpu", {"replicas": 3, "disruptionBudget": {"maxUnavailable": 2}}, 2),
        ("gpu", {"disruptionBudget": {"enabled": False}}, None),
        ("minimal-cpu", {"disruptionBudget": {"enabled": True}}, 1),
        ("autoscaling", {}, 1),  # maxReplicas > 1
        ("kserve", {}, None),  # KServe runs the pods
    ],
)
def test_disruption_budget(name: str, spec: dict[str, Any], expected: int | None) -> None:
    llmd = example(name, **spec)
    pdb = render_disruption_budget(llmd)
    if expected is None:
        assert pdb is None
        assert "PodDisruptionBudget" not in {o["kind"] for o in render_all(llmd)}
        return
    valid(pdb)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == expected
    dep = render_deployment(llmd)
    # It selects exactly the runtime pods.
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items()
    )


def admits(
    policy: dict[str, Any],
    namespace: str,
    ns_labels: dict[str, str],
    pod: dict[str, Any],
    port: str,
) -> bool:
    """NetworkPolicy ingress semantics for one source pod and one named target port."""
    pod_labels = pod["metadata"]["labels"]
    ns_labels = {**ns_labels, "kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and not any(p["port"] == port for p in rule["ports"]):
            continue
        for peer in rule["from"]:
            ns_sel = peer.get("namespaceSelector")
            pod_sel = peer.get("podSelector")
            same_ns = namespace == policy["metadata"]["namespace"]
            ns_ok = (
                same_ns if ns_sel is None else ns_sel["matchLabels"].items() <= ns_labels.items()
            )
            pod_ok = pod_sel is None or pod_sel["matchLabels"].items() <= pod_labels.items()
            if ns_ok and pod_ok:
                return True
    return False


def operator_pods() -> list[tuple[str, dict[str, Any]]]:
    """The operator's pod templates as deploy/ ships them, with their namespace."""
    docs = yaml.safe_load_all((REPO / "deploy" / "operator.yaml").read_text())
    [dep] = [d for d in docs if d and d["kind"] == "Deployment"]
    return [(dep["metadata"]["namespace"], dep["spec"]["template"])]


def test_network_policy_admits_the_peers_and_the_operator_only() -> None:
    gateway = {"podLabels": {"app": "gateway"}}
    monitoring = {"namespaceLabels": {"team": "observability"}}
    llmd = example("gpu", networkPolicy={"allowFrom": [gateway, monitoring]})
    policy = valid(render_network_policy(llmd))
    dep = render_deployment(llmd)
    assert policy["spec"]["podSelector"] == dep["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    gw_pod = {"metadata": {"labels": {"app": "gateway"}}}
    stranger = {"metadata": {"labels": {"app": "other"}}}
    assert admits(policy, "ml", {}, gw_pod, "http") and admits(policy, "ml", {}, gw_pod, "grpc")
    assert not admits(policy, "other", {}, gw_pod, "http")  # podLabels alone: same namespace
    assert admits(policy, "obs", {"team": "observability"}, stranger, "http")
    assert not admits(policy, "ml", {}, stranger, "http")
    # The operator still loads adapters over HTTP, from the namespace deploy/ installs it in.
    for namespace, template in operator_pods():
        assert admits(policy, namespace, {}, template, "http")
        assert not admits(policy, "elsewhere", {}, template, "http")
        assert not admits(policy, namespace, {}, template, "grpc")  # only what it needs
    # Empty allowFrom: nobody but the operator.
    [(op_namespace, op_pod)] = operator_pods()
    closed = valid(render_network_policy(example("gpu", networkPolicy={})))
    assert not admits(closed, "ml", {}, gw_pod, "http")
    assert admits(closed, op_namespace, {}, op_pod, "http")
    # Another operator namespace (the Helm chart installs into its release's).
    moved = render_network_policy(example("gpu", networkPolicy={"operatorNamespace": "ops"}))
    assert moved is not None and admits(moved, "ops", {}, op_pod, "http")
    assert render_network_policy(example("gpu")) is None


@pytest.mark.parametrize(
    ("rollout", "strategy"),
    [
        ({}, {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        (
            {"maxSurge": 0, "maxUnavailable": 1},
            {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        ),
        ({"strategy": "Recreate"}, {"type": "Recreate"}),
    ],
)
def test_rollout_strategy(rollout: dict[str, Any], strategy: dict[str, Any]) -> None:
    dep = valid(render_deployment(example("gpu", rollout=rollout)))
    assert dep["spec"]["strategy"] == strategy


def test_reconcile_applies_then_prunes_pdb_and_network_policy(
    cluster: Any, kube_client: HttpKubeClient, create_llmd: Any
) -> None:
    path = create_llmd("gpu", networkPolicy={"allowFrom": [{"podLabels": {"app": "gw"}}]})
    result = reconcile(kube_client, cluster.get(path))
    assert {"PodDisruptionBudget/qwen-chat", "NetworkPolicy/qwen-chat"} <= set(result.applied)
    uid = cluster.get(path)["metadata"]["uid"]
    for child in (PDB, NETPOL):
        obj = cluster.get(child)
        assert obj is not None and obj["metadata"]["ownerReferences"][0]["uid"] == uid
    # Turned off: both go, and only they.
    off = {"networkPolicy": None, "disruptionBudget": {"enabled": False}}
    cluster.patch(path, {"spec": off})
    result = reconcile(kube_client, cluster.get(path))
    assert sorted(result.applied) == ["NetworkPolicy/qwen-chat", "PodDisruptionBudget/qwen-chat"]
    assert cluster.get(PDB) is None and cluster.get(NETPOL) is None
    assert cluster.get("/apis/apps/v1/namespaces/ml/deployments/qwen-chat") is not None
