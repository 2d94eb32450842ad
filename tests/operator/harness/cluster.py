"""The test's handle on the emulated cluster: the API server on 127.0.0.1 in a background
event loop, kubectl-like helpers over HTTP, and ways to wait for the operator: for a state
(`wait_for`), or for the operator's own word that it has handled a change (`reconciled`,
`kopf_finished`; operator_log.py) — never for a quiet period."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import kmock
import yaml

from .api_server import ApiServer
from .apply import header
from .crds import CRD_PATH
from .operator_log import OperatorLog, passes

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
        self.log = OperatorLog(self.seq)
        self._log_attached = self.log.attached()
        self._log_attached.__enter__()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as api, kmock.Server(api) as server:
            self.api, self.url = api, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self._log_attached.__exit__(None, None, None)
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
        """Every request received so far; request i has sequence number i."""
        return list(self.api)

    def seq(self) -> int:
        """The sequence number the next request will get."""
        return len(self.api._requests)  # the log itself: counting it through a view is O(n)

    def writes(self, *, since: int = 0) -> list[str]:
        """Mutating requests by anyone but the test itself, as 'METHOD path'."""
        return _writes(self.requests()[since:])

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

    def reconciled(self, llmd: str, *, after: int, timeout: float = 15.0) -> int:
        """Wait for a reconcile pass of `llmd` ("namespace/name") that started after request
        `after` (so it read what that request changed) to finish; its end's sequence number.
        `after` is the trigger's own sequence number: `seq()` just before sending it."""

        def finished() -> int | None:
            for start, end in passes(self.log.snapshot(), llmd):
                if start > after and end is not None:
                    return end
            return None

        return int(self.wait_for(finished, timeout))

    def pass_writes(self, llmd: str, *, after: int) -> list[str]:
        """The writes the passes of `llmd` that started after request `after` made: the
        operator's client's writes while they ran (passes of one resource never overlap;
        kopf's own bookkeeping goes through kopf's client, and is not counted)."""
        spans = [(a, b) for a, b in passes(self.log.snapshot(), llmd) if a > after and b]
        requests = self.requests()
        return [w for a, b in spans for w in _writes(r for r in requests[a:b] if not _from_kopf(r))]

    def passes_started(self, llmd: str, *, after: int) -> int:
        """How many passes of `llmd` started after request `after`."""
        return sum(1 for start, _ in passes(self.log.snapshot(), llmd) if start > after)

    def kopf_finished(self, obj: str, *, after: int, timeout: float = 15.0) -> int:
        """Wait for kopf to finish a handling cycle of `obj` ("Kind/namespace/name"),
        its bookkeeping writes included, after request `after`; its sequence number."""
        return int(
            self.wait_for(
                lambda: next(
                    (
                        s.seq
                        for s in self.log.snapshot()
                        if s.subject == obj and s.message == "cycle finished" and s.seq > after
                    ),
                    None,
                ),
                timeout,
            )
        )


def _writes(requests: Iterable[kmock.Request]) -> list[str]:
    return [
        f"{r.method.value} {r.url.path}"
        for r in requests
        if r.method in ("POST", "PUT", "PATCH", "DELETE") and header(r, "User-Agent") != TEST_AGENT
    ]


def _from_kopf(request: kmock.Request) -> bool:
    return header(request, "User-Agent").startswith("kopf/")
