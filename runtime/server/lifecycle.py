"""The server's life after start: draining on SIGTERM, and exiting when the engine dies.

    SIGTERM ──> draining: /health and /v2/health/ready answer 503 at once, new requests
                get 503 (Connection: close); requests in flight run to completion
                (streams included) ──> idle, or --shutdown-timeout passed ──> uvicorn
                stops (sockets closed, stragglers cancelled, engine shut down) ──> exit 143
                (uvicorn re-raises the SIGTERM it caught); a second signal exits at once.
    engine thread dies ──> /health 503 (the engine's own check), every waiting request
                gets a 500 naming the failure ──> the server stops ──> exit 1, so
                Kubernetes restarts the pod instead of keeping a server that cannot answer.

`Lifecycle` is the shared state (read by the request guard and the probes);
`DrainingServer` is the uvicorn server that acts on it (`pinnace serve` runs one).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

logger = logging.getLogger("pinnace.server")

# After an engine failure: time for the clients already told (500) to read their answer.
FATAL_GRACE_S = 2.0


@dataclass
class Lifecycle:
    """Draining / failed state and the requests in flight (event-loop side, except the
    plain assignments a signal handler makes)."""

    draining: bool = False
    drain_started: float | None = None
    fatal: str | None = None  # why the engine died
    in_flight: int = 0

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    def engine_failed(self, reason: str) -> None:
        """Called on the event loop when the engine thread dies."""
        if self.fatal is None:
            self.fatal = reason
            logger.error("the engine died (%s): stopping the server, exit status 1", reason)
            self.begin_drain()

    @property
    def ready(self) -> bool:
        return not self.draining and self.fatal is None

    @property
    def exit_code(self) -> int:
        return 1 if self.fatal is not None else 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT turned into a drain of at most
    `shutdown_timeout` seconds, and an engine failure into a stop."""

    def __init__(
        self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._captured_signals.append(sig)  # re-raised after shutdown: exit status 143
        self.lifecycle.begin_drain()  # only assignments: safe in a signal handler
        logger.info(
            "draining: not ready, refusing new requests, waiting up to %gs for %d in flight",
            self.shutdown_timeout,
            self.lifecycle.in_flight,
        )

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s (uvicorn's main loop): stop once the drain is over."""
        life = self.lifecycle
        if life.draining and not self.should_exit and life.drain_started is not None:
            waited = time.monotonic() - life.drain_started
            limit = FATAL_GRACE_S if life.fatal is not None else self.shutdown_timeout
            if life.in_flight == 0 or waited >= limit:
                if life.in_flight:
                    logger.warning("shutdown timeout: %d requests cut off", life.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(
    app: Callable[..., Any],
    lifecycle: Lifecycle,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    log_level: str = "info",
    loop: str = "auto",
) -> int:
    """Serve until drained or failed; the process exit status (0, or 1 if the engine died;
    after SIGTERM uvicorn re-raises the signal once shut down, so the process ends 143)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop=loop,
        # The drain above already waited; this only bounds closing idle connections.
        timeout_graceful_shutdown=5,
    )
    # uvicorn re-raises the SIGINT it caught once a Ctrl-C drain is over: that is a clean exit.
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config, lifecycle, shutdown_timeout).run()
    return lifecycle.exit_code
