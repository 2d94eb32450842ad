"""PATCH as a real API server applies it: merge patch, JSON patch and server-side apply.

JSON patch (RFC 6902) is what kopf uses for finalizers; a failed "test" op is a 409. A
strategic merge patch is a merge patch whose status.conditions merge by type. Server-side
apply creates the object if it is absent, and removes the fields its manager applied before
and no longer applies. The status subresource alone changes status, the main resource never
does. Generation is bumped on spec changes only. A write that changes nothing is a no-op, as
on a real API server: same resourceVersion, no watch event.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import enums, k8s

from .objects import ObjectStore


def merge(old: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def dropped(old_applied: Any, new_applied: Any) -> Any:
    """Nulls for fields a field manager applied before and no longer applies (SSA)."""
    if not isinstance(old_applied, dict) or not isinstance(new_applied, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in old_applied.items():
        if key not in new_applied:
            out[key] = None
        else:
            sub = dropped(value, new_applied[key])
            if sub:
                out[key] = sub
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            out[key] = _diff(old[key], value)
        elif old.get(key) != value:
            out[key] = value
    return out


def _conditions_by_type(old: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge patch's one list merge the operator relies on: a pod's
    status.conditions are merged by `type` (its patchMergeKey), not replaced."""
    new_conditions = (patch.get("status") or {}).get("conditions")
    if not isinstance(new_conditions, list):
        return patch
    merged = [dict(c) for c in (old.get("status") or {}).get("conditions") or []]
    for condition in new_conditions:
        same = next((c for c in merged if c.get("type") == condition.get("type")), None)
        if same is None:
            merged.append(dict(condition))
        else:
            same.update(condition)
    return {**patch, "status": {**patch["status"], "conditions": merged}}


def header(request: kmock.Request, name: str) -> str:
    """A request header by name, matched case-insensitively as HTTP says."""
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


@attrs.define(kw_only=True)
class Patches(ObjectStore):
    """PATCH requests rewritten into the full update kmock then stores."""

    _applied: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def _on_patch(self, request: kmock.Request) -> kmock.Request:
        key = self._find(request, request.name)
        content_type = header(request, "Content-Type")
        is_apply = "apply-patch" in content_type
        old = self.objects[key].raw if key is not None else {}
        if "json-patch" in content_type:  # RFC 6902 (kopf uses it for finalizers)
            try:
                patch = _diff(old, jsonpatch.apply_patch(old, request.data))
            except jsonpatch.JsonPatchConflict as exc:  # a failed "test" op
                raise k8s.KubernetesError(status=409, reason="Conflict", message=str(exc)) from exc
        else:
            patch = dict(request.data or {})
        if key is None:
            if not is_apply:
                raise k8s.KubernetesObjectNotFoundError()
            self._applied[(request.resource, request.namespace, request.name)] = patch
            create = attrs.evolve(request, name=None, subresource=None)
            return self._on_create(create, copy.deepcopy(patch))
        if is_apply:  # server-side apply: drop what this manager no longer applies
            patch = merge(dropped(self._applied.get(key), patch), patch)
            self._applied[key] = dict(request.data)
        has_status = "status" in self.resources[request.resource].subresources
        if request.subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        elif has_status:
            patch.pop("status", None)  # the main resource ignores status changes
        if "strategic-merge-patch" in content_type:
            patch = _conditions_by_type(old, patch)
        new = self._admit(request, merge(old, patch))
        if new == old:  # a no-op: nothing stored, no new resourceVersion, no watch event
            return attrs.evolve(request, action=enums.action.FETCH)
        new.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        # kmock merges the request data into the stored object: send the full difference.
        return attrs.evolve(request, action=enums.action.UPDATE, data=_diff(old, new))
