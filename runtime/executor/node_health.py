"""Liveness between the nodes of a multi-node group, through the group's own TCPStore.

Collectives fail when a peer's connection closes, but only while a step runs: an idle
leader would not notice a dead node until the next request, and a node whose leader
vanished could wait in a broadcast until the collective timeout. So each node other than
node 0 keeps a heartbeat in the store rank 0 hosts (the rendezvous store, not a protocol
of our own), and:

    node R > 0   LeaderWatch: every BEAT_S adds 1 to  pinnace/node/R/beats;  the store
                 gone (rank 0's process ended) -> this node exits 1, unless the leader
                 closed the group first (then the node marks pinnace/node/R/closed, exit 0);
                 a local rank that died -> pinnace/node/R/failed = why, exit 1
    node 0       RemoteNodes.check (the executor's check_health, about once a second):
                 WorkerDiedError when a node failed, or its beats stopped for the timeout

Keys are counters read with add(key, 0), so no clocks are compared across nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

import torch.distributed as dist

from pinnace.runtime.executor.executor import WorkerDiedError

logger = logging.getLogger("pinnace.runtime")

BEAT_S = 1.0
# A node whose heartbeat stops this long is taken for dead (its process killed, its pod
# gone); generous against a busy CPU, well inside the 30 s a client waits for an error.
NODE_TIMEOUT_ENV = "PINNACE_NODE_TIMEOUT_S"
DEFAULT_NODE_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 10.0
CHECK_EVERY_S = 0.5  # the executor asks every step: the store is asked at most this often
STORE_OP_TIMEOUT = datetime.timedelta(seconds=5)


def _key(node_rank: int, what: str) -> str:
    return f"pinnace/node/{node_rank}/{what}"


def store_client(addr: str, port: int) -> dist.TCPStore:
    """A connection of its own to rank 0's store (its ops never wait on the group's)."""
    return dist.TCPStore(addr, port, None, False, timeout=STORE_OP_TIMEOUT)


class RemoteNodes:
    """Node 0's view of nodes 1..nnodes-1 (created once the group is complete)."""

    def __init__(self, addr: str, port: int, nnodes: int) -> None:
        self.store = store_client(addr, port)
        self.timeout = float(os.environ.get(NODE_TIMEOUT_ENV, DEFAULT_NODE_TIMEOUT_S))
        now = time.monotonic()
        self._beats = {r: (-1, now) for r in range(1, nnodes)}  # node -> (count, seen at)
        self._checked = 0.0

    def check(self) -> None:
        """WorkerDiedError naming the first node that failed or stopped beating."""
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        try:
            self._check(now)
        except dist.DistError as exc:  # rank 0 hosts the store: its client should not fail
            raise WorkerDiedError(f"the group's store failed: {exc!s:.200}") from exc

    def _check(self, now: float) -> None:
        for node, (count, seen) in self._beats.items():
            if self.store.check([_key(node, "failed")]):
                why = self.store.get(_key(node, "failed")).decode()
                raise WorkerDiedError(f"node {node} failed: {why}")
            current = int(self.store.add(_key(node, "beats"), 0))
            if current != count:
                self._beats[node] = (current, now)
            elif now - seen > self.timeout:
                raise WorkerDiedError(
                    f"node {node} sent no heartbeat for {now - seen:.0f} s (its process or "
                    "pod is gone): the engine cannot run without all its ranks."
                )

    def wait_closed(self) -> None:
        """Until every node has read the close (then rank 0 may take the store down)."""
        keys = [_key(node, "closed") for node in self._beats]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=CLOSE_WAIT_S))
        except dist.DistError:
            logger.warning("not every node confirmed the group's close within %.0f s", CLOSE_WAIT_S)


class LeaderWatch:
    """A node's heartbeat thread (node_rank > 0): see the module docstring.

    `ranks`: this node's spawned rank processes, watched too. `on_lost(code, why)` ends
    the process (os._exit; a test passes its own)."""

    def __init__(
        self,
        addr: str,
        port: int,
        node_rank: int,
        ranks: Sequence[BaseProcess] = (),
        on_lost: Callable[[int, str], None] | None = None,
    ) -> None:
        self.node_rank, self.ranks = node_rank, list(ranks)
        self.where = f"{addr}:{port}"
        self.store = store_client(addr, port)
        self.closing = threading.Event()
        self.on_lost = on_lost or _exit
        self.thread = threading.Thread(target=self._run, name="leader-watch", daemon=True)

    def start(self) -> LeaderWatch:
        self.thread.start()
        return self

    def close(self) -> None:
        """The leader closed the group: stop beating, and say so (the leader waits)."""
        self.closing.set()
        self.thread.join(timeout=2 * BEAT_S + STORE_OP_TIMEOUT.total_seconds())
        with contextlib.suppress(dist.DistError):  # else the leader stopped waiting
            self.store.set(_key(self.node_rank, "closed"), "1")

    def _run(self) -> None:
        while not self.closing.is_set():
            try:
                self.store.add(_key(self.node_rank, "beats"), 1)
            except dist.DistError as exc:
                if not self.closing.is_set():
                    self.on_lost(1, f"the leader's store at {self.where} is gone ({exc!s:.80})")
                return
            dead = next((p for p in self.ranks if not p.is_alive()), None)
            if dead is not None:
                why = f"rank process {dead.name} exited with status {dead.exitcode}"
                with contextlib.suppress(dist.DistError):
                    self.store.set(_key(self.node_rank, "failed"), why)
                self.on_lost(1, why)
                return
            self.closing.wait(BEAT_S)


def _exit(code: int, why: str) -> None:
    logger.error("node exits: %s", why)
    logging.shutdown()
    os._exit(code)
