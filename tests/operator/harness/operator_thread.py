"""The real kopf operator (our handler registry) in a thread, talking HTTP to the emulator."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf
import kubernetes

from pinnace.operator.client import HttpKubeClient
from pinnace.operator.handlers import build_registry


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

        config = kubernetes.client.Configuration(host=url)
        self.memo = kopf.Memo(client=HttpKubeClient(kubernetes.client.ApiClient(config)))
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
