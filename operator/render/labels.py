"""Labels, selectors and content hashes shared by every rendered child."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment


def selector_labels(llmd: LLMDeployment) -> dict[str, str]:
    """The immutable Deployment selector: never add a label here that can change."""
    return {names.LABEL_NAME: names.APP_NAME, names.LABEL_INSTANCE: llmd.name}


def serving_labels(llmd: LLMDeployment) -> dict[str, str]:
    """The pods that serve the API: every runtime pod, or only the leader of each group of
    a multi-node replica (its workers run ranks, not the API)."""
    if llmd.is_multi_node:
        return {**selector_labels(llmd), names.LWS_WORKER_INDEX_LABEL: "0"}
    return selector_labels(llmd)


def common_labels(llmd: LLMDeployment) -> dict[str, str]:
    labels = {
        **selector_labels(llmd),
        names.LABEL_COMPONENT: names.COMPONENT,
        names.LABEL_MANAGED_BY: names.FIELD_MANAGER,
    }
    tag = llmd.image.rsplit(":", 1)[-1] if ":" in llmd.image.rsplit("/", 1)[-1] else ""
    if tag and len(tag) <= 63 and "@" not in llmd.image:
        labels[names.LABEL_VERSION] = tag
    return labels


def selector_string(llmd: LLMDeployment) -> str:
    """`status.selector` for the scale subresource (HPA reads it): one pod per replica."""
    return ",".join(f"{k}={v}" for k, v in sorted(serving_labels(llmd).items()))


def content_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able value (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def metadata(llmd: LLMDeployment, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": llmd.namespace, "labels": common_labels(llmd)}


def stamp_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Record the hash of the object itself, so reconcile can tell "already applied"."""
    annotations = obj["metadata"].setdefault("annotations", {})
    annotations.pop(names.ANNOTATION_APPLIED_HASH, None)
    annotations[names.ANNOTATION_APPLIED_HASH] = content_hash(obj)
    return obj
