"""Pure renderers: `LLMDeployment` -> the Kubernetes objects that run it. No API calls.

`render_all` is the whole contract between the operator and `pinnace render`: the
operator applies exactly these objects (plus an ownerReference to the resource), and
removes the ones it owns that are no longer rendered (`PRUNABLE`).
"""

from __future__ import annotations

from typing import Any

from pinnace.operator import children
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render.adapters import render_fetch_jobs
from pinnace.operator.render.autoscaling import render_autoscaler
from pinnace.operator.render.deployment import render_deployment
from pinnace.operator.render.disruption import render_disruption_budget
from pinnace.operator.render.kserve import render_inference_service, render_serving_runtime
from pinnace.operator.render.leaderworkerset import render_leader_worker_set
from pinnace.operator.render.network_policy import render_network_policy
from pinnace.operator.render.service import endpoint, render_service
from pinnace.operator.render.storage import render_cache_pvc

__all__ = [
    "PRUNABLE",
    "endpoint",
    "render_all",
    "render_autoscaler",
    "render_cache_pvc",
    "render_deployment",
    "render_disruption_budget",
    "render_fetch_jobs",
    "render_inference_service",
    "render_leader_worker_set",
    "render_network_policy",
    "render_service",
    "render_serving_runtime",
    "render_workload",
]

# Children that go when the spec stops asking for them (switching serving.mode, dropping
# autoscaling, a PDB or NetworkPolicy turned off), all named after the resource: the
# `prune` rows of children.py. Never the cache PVC: it holds downloaded weights, and goes
# with the resource itself. (Adapter fetch Jobs have names of their own and are pruned by
# label: `render.adapters.fetch_job_selector`.)
PRUNABLE = children.PRUNABLE


def render_all(llmd: LLMDeployment) -> list[dict[str, Any]]:
    """Children in apply order: what others reference comes first."""
    if llmd.spec.serving.is_kserve:
        return [render_serving_runtime(llmd), render_inference_service(llmd)]
    optional = (render_cache_pvc(llmd), render_network_policy(llmd))
    after = (render_disruption_budget(llmd), render_autoscaler(llmd))
    return [
        *(obj for obj in optional if obj),  # the policy is in place before any pod starts
        *render_fetch_jobs(llmd),  # they fill the cache the pods mount
        render_service(llmd),
        render_workload(llmd),
        *(obj for obj in after if obj),
    ]


def render_workload(llmd: LLMDeployment) -> dict[str, Any]:
    """What runs the pods in Deployment mode: a Deployment, or a LeaderWorkerSet when a
    replica is a group of pods (its GPUs exceed one pod's)."""
    return render_leader_worker_set(llmd) if llmd.is_multi_node else render_deployment(llmd)
