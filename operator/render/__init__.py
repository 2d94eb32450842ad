"""Pure renderers: `LLMDeployment` -> the Kubernetes objects that run it. No API calls.

`render_all` is the whole contract between the operator and `pinnace render`: the
operator applies exactly these objects (plus an ownerReference to the resource).
"""

from __future__ import annotations

from typing import Any

from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render.deployment import render_deployment
from pinnace.operator.render.service import endpoint, render_service
from pinnace.operator.render.storage import render_cache_pvc

__all__ = ["endpoint", "render_all", "render_cache_pvc", "render_deployment", "render_service"]


def render_all(llmd: LLMDeployment) -> list[dict[str, Any]]:
    """Children in apply order: the cache PVC (if any) before the pods that mount it."""
    pvc = render_cache_pvc(llmd)
    return [*([pvc] if pvc else []), render_service(llmd), render_deployment(llmd)]
