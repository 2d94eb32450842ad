"""How the runtime's pods are placed, replaced and reached: `spec.scheduling` (copied into
the pod spec), `spec.rollout`, `spec.disruptionBudget` and `spec.networkPolicy` (the last
three in Deployment mode only; KServe runs its own pods)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from pinnace.operator.spec_base import DNS_LABEL_PATTERN, Rule, SpecModel

TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class Toleration(SpecModel):
    key: str | None = None
    operator: TolerationOperator | None = None
    value: str | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None


class Scheduling(SpecModel):
    """Copied into the pod spec as is."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


LABEL_MAP_DESCRIPTION = "Labels it must carry (matchLabels)."


# The rollout default is RollingUpdate with maxSurge 1 and maxUnavailable 0: no capacity is
# lost, but a cluster needs room for one extra replica's GPUs. Where GPUs are scarce use
# maxSurge 0 with maxUnavailable 1 (a replica goes down before its replacement starts), or
# Recreate (every old pod goes first: downtime, but never two copies of a model at once).
class Rollout(SpecModel):
    """How pods are replaced when the pod template changes (Deployment mode)."""

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate",
        description="The Deployment's strategy. The default (maxSurge 1, maxUnavailable 0) "
        "needs room for one extra replica's GPUs; where GPUs are scarce set maxSurge 0 and "
        "maxUnavailable 1, or use Recreate (downtime, never two copies at once).",
    )
    max_surge: int | None = Field(
        default=None, ge=0, le=1000, description="Extra pods during a rollout (default 1)."
    )
    max_unavailable: int | None = Field(
        default=None, ge=0, le=1000, description="Pods that may be down at once (default 0)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.strategy == 'RollingUpdate'"
            " || (!has(self.maxSurge) && !has(self.maxUnavailable))",
            "rollout.maxSurge and rollout.maxUnavailable apply only to strategy RollingUpdate",
            lambda r: (
                r.strategy == "RollingUpdate" or (r.max_surge is None and r.max_unavailable is None)
            ),
        ),
        Rule(
            "self.strategy != 'RollingUpdate' || (has(self.maxSurge) ? self.maxSurge : 1)"
            " + (has(self.maxUnavailable) ? self.maxUnavailable : 0) > 0",
            "rollout: maxSurge and maxUnavailable cannot both be 0 (nothing could be replaced)",
            lambda r: r.strategy != "RollingUpdate" or r.surge + r.unavailable > 0,
        ),
    )

    @property
    def surge(self) -> int:
        return 1 if self.max_surge is None else self.max_surge

    @property
    def unavailable(self) -> int:
        return 0 if self.max_unavailable is None else self.max_unavailable


class DisruptionBudget(SpecModel):
    """A PodDisruptionBudget: node drains and cluster upgrades take replicas down one by one."""

    enabled: bool | None = Field(
        default=None,
        description="Default: on when more than one replica may run (replicas > 1, or "
        "autoscaling.maxReplicas > 1); a single replica gets none, so drains are not blocked.",
    )
    max_unavailable: int = Field(
        default=1, ge=1, le=1000, description="Replicas a voluntary disruption may take at once."
    )


class NetworkPeer(SpecModel):
    """Pods allowed in: in namespaces with these labels, and/or with these labels."""

    namespace_labels: dict[str, str] | None = Field(
        default=None,
        description=f"The namespace's labels; absent: this namespace only. {LABEL_MAP_DESCRIPTION}",
    )
    pod_labels: dict[str, str] | None = Field(
        default=None, description=f"The pod's labels; absent: any pod. {LABEL_MAP_DESCRIPTION}"
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.namespaceLabels) || has(self.podLabels)",
            "networkPolicy.allowFrom: each peer needs namespaceLabels or podLabels",
            lambda p: p.namespace_labels is not None or p.pod_labels is not None,
        ),
    )


class NetworkPolicy(SpecModel):
    """Present: a NetworkPolicy admits only these peers (and the operator) to the pods."""

    allow_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the API (HTTP and gRPC ports); empty: nobody but the operator.",
    )
    operator_namespace: str = Field(
        default="pinnace-system",
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Namespace of the operator, whose pods load LoRA adapters over HTTP.",
    )
