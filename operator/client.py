"""The few API calls the operator makes, behind a small interface.

`KubeClient` is what reconcile needs: read or list objects, server-side apply one, delete
one it no longer renders, and merge-patch a status. `HttpKubeClient` implements it with the
official client's authenticated HTTP layer, so every request is visible (and countable)
on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

import kubernetes

from pinnace.operator import names
from pinnace.operator.children import KINDS

# kind -> (apiVersion, plural); the operator only ever touches these (children.py's table).
RESOURCES: dict[str, tuple[str, str]] = {k.kind: (k.api_version, k.plural) for k in KINDS}


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def is_permanent(self) -> bool:
        """Rejected as invalid (400/422): retrying the same object cannot succeed."""
        return self.status in (400, 422)


class KubeClient(Protocol):
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""

    def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace that match an equality label selector."""

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (create or update the fields we own); returns the live object."""

    def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """JSON merge patch of the status subresource."""

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete the object if it is still the one with this uid (gone already is fine)."""

    def patch_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> None:
        """Set one condition in a pod's status (merged by type: the kubelet's stay)."""


def object_path(kind: str, namespace: str, name: str | None = None) -> str:
    api_version, plural = RESOURCES[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class HttpKubeClient:
    """`KubeClient` over `kubernetes.client.ApiClient` (kubeconfig or in-cluster auth)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        self._api = api_client
        self._timeout = timeout

    @classmethod
    def from_environment(cls) -> HttpKubeClient:
        """In-cluster service account if present, else the current kubeconfig context."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient())

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self._request("GET", object_path(kind, namespace, name))
        if status == 404:
            return None
        return _checked(status, body)

    def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector}
        status, body = self._request("GET", object_path(kind, namespace), query)
        return [dict(item) for item in _checked(status, body).get("items") or []]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])
        query = {"fieldManager": names.FIELD_MANAGER, "force": "true"}
        status, body = self._request(
            "PATCH", path, query, obj, content_type="application/apply-patch+yaml"
        )
        return _checked(status, body)

    def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        path = object_path(kind, namespace, name) + "/status"
        code, body = self._request(
            "PATCH", path, None, {"status": status}, content_type="application/merge-patch+json"
        )
        _checked(code, body)

    def patch_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> None:
        # A strategic merge patch: pods merge status.conditions by type, so the kubelet's
        # own conditions are kept (a JSON merge patch would replace the whole list).
        path = object_path("Pod", namespace, name) + "/status"
        body = {"status": {"conditions": [dict(condition)]}}
        content_type = "application/strategic-merge-patch+json"
        code, answer = self._request("PATCH", path, None, body, content_type=content_type)
        if code != 404:  # the pod went away meanwhile
            _checked(code, answer)

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        # The uid precondition: never delete a same-named object created since we looked.
        body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        code, answer = self._request("DELETE", object_path(kind, namespace, name), None, body)
        if code not in (404, 409):  # gone, or replaced by another object: nothing to do
            _checked(code, answer)

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, _, _ = self._api.param_serialize(
            method, path, header_params=headers, auth_settings=["BearerToken"]
        )
        # The REST layer serialises dict bodies as JSON (valid YAML for apply-patch+yaml too).
        response = self._api.call_api(method, url, headers, body, _request_timeout=self._timeout)
        raw = response.read()
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"message": raw.decode(errors="replace")[:200]}


def _checked(status: int, body: Any) -> dict[str, Any]:
    if not 200 <= status < 300:
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        raise ApiError(status, message)
    return dict(body)
