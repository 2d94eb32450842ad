"""The runtime's adapter endpoints, as the operator calls them on each pod.

The contract is vLLM's: `GET /v1/models` lists the base model and the loaded adapters
(an adapter's `parent` is the base model, its `root` the path it was loaded from);
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter
{"lora_name"}`; all behind `Authorization: Bearer <key>` when the runtime has an API key.
`RuntimeClient` is the seam tests use to stand in for pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

LIST_TIMEOUT = httpx.Timeout(5.0, connect=3.0)
# Loading reads the adapter's weights from disk and copies them to the device.
LOAD_TIMEOUT = httpx.Timeout(60.0, connect=3.0)


@dataclass(frozen=True)
class PodEndpoint:
    """One ready runtime pod, as the operator reaches it."""

    name: str
    uid: str
    url: str  # http://<podIP>:<port>


class RuntimeCallError(Exception):
    """A call to a pod failed: refused, timed out, or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RuntimeClient(Protocol):
    def list_adapters(self, pod: PodEndpoint, api_key: str | None) -> dict[str, str | None]:
        """Loaded adapters: name -> the path it was loaded from (None if not reported)."""

    def load_adapter(self, pod: PodEndpoint, api_key: str | None, name: str, path: str) -> None:
        """Load `path` under `name`; raises `RuntimeCallError`."""

    def unload_adapter(self, pod: PodEndpoint, api_key: str | None, name: str) -> None:
        """Unload `name`; an adapter the pod does not know is already unloaded."""


class HttpRuntimeClient:
    """`RuntimeClient` over HTTP (a fresh connection pool per call: pods come and go)."""

    def list_adapters(self, pod: PodEndpoint, api_key: str | None) -> dict[str, str | None]:
        body = self._call("GET", pod, "/v1/models", api_key, None, LIST_TIMEOUT)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise RuntimeCallError("GET /v1/models: the answer has no 'data' list")
        return {
            str(m["id"]): (str(m["root"]) if m.get("root") else None)
            for m in data
            if isinstance(m, dict) and m.get("parent") and "id" in m
        }

    def load_adapter(self, pod: PodEndpoint, api_key: str | None, name: str, path: str) -> None:
        payload = {"lora_name": name, "lora_path": path}
        self._call("POST", pod, "/v1/load_lora_adapter", api_key, payload, LOAD_TIMEOUT)

    def unload_adapter(self, pod: PodEndpoint, api_key: str | None, name: str) -> None:
        try:
            payload = {"lora_name": name}
            self._call("POST", pod, "/v1/unload_lora_adapter", api_key, payload, LIST_TIMEOUT)
        except RuntimeCallError as err:
            if err.status != 404:
                raise

    @staticmethod
    def _call(
        method: str,
        pod: PodEndpoint,
        path: str,
        api_key: str | None,
        payload: Mapping[str, str] | None,
        timeout: httpx.Timeout,
    ) -> Any:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with httpx.Client(timeout=timeout) as http:
                response = http.request(method, pod.url + path, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise RuntimeCallError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            message = _error_message(response)
            raise RuntimeCallError(
                f"{method} {path}: HTTP {response.status_code}: {message}", response.status_code
            )
        try:
            return response.json() if response.content else {}
        except ValueError:
            return {}


def _error_message(response: httpx.Response) -> str:
    """The OpenAI error body's message, or the start of whatever came back."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:500]
    if isinstance(body, dict) and body.get("message"):  # vLLM's older flat error body
        return str(body["message"])[:500]
    return str(body)[:200]


def pod_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip  # IPv6
    return f"http://{host}:{port}"
