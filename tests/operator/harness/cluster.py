"""The test's handle on the emulated cluster: the API server on 127.0.0.1 in a background
event loop, kubectl-like helpers over HTTP, and ways to wait for the operator."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import kmock
import yaml

from .api_server import ApiServer
from .apply import header
from .crds import CRD_PATH

TEST_AGENT = "pinnace-tests"


class Cluster:
    """The emulator served on 127.0.0.1 from a background event loop, plus a test client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock server did not start")
        self.http = httpx.Client(base_url=self.url, headers={"User-Agent": TEST_AGENT}, timeout=10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as api, kmock.Server(api) as server:
            self.api, self.url = api, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self.http.close()
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- kubectl-like helpers (they go through HTTP like any client) --

    def apply_crd(self, crd: dict[str, Any] | None = None) -> None:
        crd = crd if crd is not None else yaml.safe_load(CRD_PATH.read_text())
        self.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)

    def post(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=obj)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def patch(self, path: str, patch: dict[str, Any]) -> httpx.Response:
        headers = {"Content-Type": "application/merge-patch+json"}
        return self.http.patch(path, json=patch, headers=headers)

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(path)
        return None if response.status_code == 404 else dict(response.json())

    def requests(self) -> list[kmock.Request]:
        return list(self.api)

    def writes(self, *, since: int = 0) -> list[str]:
        """Mutating requests by anyone but the test itself, as 'METHOD path'."""
        return [
            f"{r.method} {r.url.path}"
            for r in self.requests()[since:]
            if r.method in ("POST", "PUT", "PATCH", "DELETE")
            and header(r, "User-Agent") != TEST_AGENT
        ]

    def pruned_writes(self) -> list[str]:
        """Writes by anyone but the test whose fields the API server dropped (a rendered
        custom resource with a field its CRD does not have), as 'METHOD path: fields'."""
        return [
            f"{r.method} {r.url.path}: {', '.join(fields)}"
            for r, fields in self.api.pruned
            if header(r, "User-Agent") != TEST_AGENT
        ]

    def events(self, reason: str) -> list[dict[str, Any]]:
        """The Events anyone has posted with this reason so far, oldest first."""
        return [
            r.data
            for r in self.requests()
            if r.method == "POST"
            and r.url.path.endswith("/events")
            and r.data.get("reason") == reason
        ]

    # -- waiting on the operator: it acts in its own thread, so tests poll what it did --

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Poll until `predicate()` is truthy and return that value (the awaited object)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {predicate}")

    def settle(self, quiet: float = 0.8) -> None:
        """Wait until nobody has made a request for `quiet` seconds: the operator is idle,
        so a later "no write happened" check is not just early."""
        last, since = len(self.requests()), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.05)
            now = len(self.requests())
            if now != last:
                last, since = now, time.monotonic()
