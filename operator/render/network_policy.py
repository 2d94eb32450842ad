"""The optional NetworkPolicy: only the peers `spec.networkPolicy.allowFrom` names reach
the runtime pods' API ports, plus the operator's own pods on the HTTP port (they load LoRA
adapters with `POST /v1/load_lora_adapter`). Egress is left alone: downloads and the
Hugging Face Hub go through init containers and the pods' own outbound calls.
"""

from __future__ import annotations

from typing import Any

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.pod_policy_spec import NetworkPeer
from pinnace.operator.render import labels
from pinnace.operator.render.args import serves_grpc

# The operator's pods carry this label in deploy/operator.yaml and in the Helm chart.
OPERATOR_POD_LABELS = {names.LABEL_NAME: "pinnace-operator"}
# Set by Kubernetes on every namespace (1.21+): selects one namespace by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def render_network_policy(llmd: LLMDeployment) -> dict[str, Any] | None:
    policy = llmd.spec.network_policy
    if policy is None or llmd.spec.serving.is_kserve:
        return None
    api_ports = [{"port": names.PORT_NAME, "protocol": "TCP"}]
    if serves_grpc(llmd):
        api_ports.append({"port": names.GRPC_PORT_NAME, "protocol": "TCP"})
    operator = {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: policy.operator_namespace}},
        "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
    }
    ingress: list[dict[str, Any]] = []
    if policy.allow_from:
        peers = [_peer(p) for p in policy.allow_from]
        ingress.append({"from": peers, "ports": api_ports})
    ingress.append({"from": [operator], "ports": [{"port": names.PORT_NAME, "protocol": "TCP"}]})
    if llmd.is_multi_node:
        # The pods of a group talk to each other: the rendezvous on the leader, then the
        # collectives (NCCL/gloo) on ports of their own choosing, so every port.
        ingress.append({"from": [{"podSelector": {"matchLabels": labels.selector_labels(llmd)}}]})
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "podSelector": {"matchLabels": labels.selector_labels(llmd)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
    return labels.stamp_applied_hash(obj)


def _peer(peer: NetworkPeer) -> dict[str, Any]:
    """A NetworkPolicyPeer: a podSelector alone means pods of the policy's namespace."""
    out: dict[str, Any] = {}
    if peer.namespace_labels is not None:
        out["namespaceSelector"] = {"matchLabels": dict(peer.namespace_labels)}
    if peer.pod_labels is not None:
        out["podSelector"] = {"matchLabels": dict(peer.pod_labels)}
    return out
