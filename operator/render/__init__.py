"""Pure renderers: `LLMDeployment` -> the Kubernetes objects that run it. No API calls.

`render_all` is the whole contract between the operator and `pinnace render`: the
operator applies exactly these objects (plus an ownerReference to the resource), and
removes the ones it owns that are no longer rendered (`PRUNABLE`).
"""

from __future__ import annotations

from typing import Any

from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render.adapters import render_fetch_jobs
from pinnace.operator.render.autoscaling import render_autoscaler
from pinnace.operator.render.deployment import render_deployment
from pinnace.operator.render.kserve import render_inference_service, render_serving_runtime
from pinnace.operator.render.service import endpoint, render_service
from pinnace.operator.render.storage import render_cache_pvc

__all__ = [
    "PRUNABLE",
    "endpoint",
    "render_all",
    "render_autoscaler",
    "render_cache_pvc",
    "render_deployment",
    "render_fetch_jobs",
    "render_inference_service",
    "render_service",
    "render_serving_runtime",
]

# Children that go when the spec stops asking for them (switching serving.mode, dropping
# autoscaling), all named after the resource. Never the cache PVC: it holds downloaded
# weights, and goes with the resource itself. (Adapter fetch Jobs have names of their own
# and are pruned by label: `render.adapters.fetch_job_selector`.)
PRUNABLE = (
    "InferenceService",
    "ServingRuntime",
    "HorizontalPodAutoscaler",
    "ScaledObject",
    "Deployment",
    "Service",
)


def render_all(llmd: LLMDeployment) -> list[dict[str, Any]]:
    """Children in apply order: what others reference comes first."""
    if llmd.spec.serving.is_kserve:
        return [render_serving_runtime(llmd), render_inference_service(llmd)]
    pvc = render_cache_pvc(llmd)
    autoscaler = render_autoscaler(llmd)
    return [
        *([pvc] if pvc else []),
        *render_fetch_jobs(llmd),  # they fill the cache the pods mount
        render_service(llmd),
        render_deployment(llmd),
        *([autoscaler] if autoscaler else []),
    ]
