"""The PodDisruptionBudget: voluntary disruptions (node drains, cluster upgrades) take the
runtime pods down `maxUnavailable` at a time, so a model with several replicas keeps serving.

On by default when more than one replica may run; a single replica gets none (with one
pod, any budget either blocks every drain or allows the outage anyway).
"""

from __future__ import annotations

from typing import Any

from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import labels


def render_disruption_budget(llmd: LLMDeployment) -> dict[str, Any] | None:
    if llmd.spec.serving.is_kserve or not llmd.wants_disruption_budget:
        return None
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "selector": {"matchLabels": labels.selector_labels(llmd)},
            "maxUnavailable": llmd.spec.disruption_budget.max_unavailable,
            # A pod still loading its model (not Ready) may be evicted: it serves nobody,
            # and would otherwise block a drain for as long as the load takes.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    return labels.stamp_applied_hash(pdb)
