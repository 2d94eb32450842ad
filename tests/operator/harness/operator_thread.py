"""The real kopf operator (our handler registry) in a thread, talking HTTP to the emulator."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf
import kubernetes

from pinnace.operator.client import HttpKubeClient
from pinnace.operator.handlers import RetryPolicy, build_registry

# The test operator retries a failed pass after 0.2 s, 0.4 s, ... capped at 1.6 s.
RETRY = RetryPolicy(first=0.2, cap=1.6)


class Operator:
    """The real kopf operator (our registry) in a thread, talking HTTP to the emulator."""

    def __init__(self, url: str, namespaces: list[str]) -> None:
        registry = build_registry(login=False)

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        @kopf.on.startup(registry=registry)
        def no_scanning(settings: kopf.OperatorSettings, **_: Any) -> None:
            # kmock cannot parse /api/v1/namespaces (it reads "namespaces" as a namespace
            # segment), so kopf takes the namespaces as given instead of listing them.
            settings.scanning.disabled = True
            # Short backoffs, so a retry storm or a missing retry shows within a test's
            # window: kopf's for unexpected errors (60 s by default) and ours (RETRY).
            settings.execution.default_backoff = RETRY.first

        config = kubernetes.client.Configuration(host=url)
        client = HttpKubeClient(kubernetes.client.ApiClient(config))
        self.memo = kopf.Memo(client=client, retry=RETRY)
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        kwargs = dict(
            registry=registry,
            namespaces=namespaces,
            standalone=True,
            memo=self.memo,
            stop_flag=self.stop_flag,
            ready_flag=self.ready_flag,
        )
        self._thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self._thread.start()
        if not self.ready_flag.wait(15):
            raise RuntimeError("operator did not start")

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            asyncio.run(kopf.operator(**kwargs))
        except BaseException as exc:  # surfaced by `alive`
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        self.stop_flag.set()
        self._thread.join(30)
