"""The weights cache PVC, when the spec asks the operator to create one (storage.cache.size)."""

from __future__ import annotations

from typing import Any

from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import labels


def render_cache_pvc(llmd: LLMDeployment) -> dict[str, Any] | None:
    cache = llmd.spec.storage.cache
    if cache is None or cache.size is None:
        return None  # an emptyDir, or the user's own claim
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": labels.metadata(llmd, f"{llmd.name}-cache"),
        "spec": spec,
    }
    return labels.stamp_applied_hash(pvc)
