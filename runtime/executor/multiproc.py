"""One process per rank, started by the engine: rank 0 is the caller (the driver).

Start-up: the driver picks the rendezvous port, spawns ranks 1..N-1, and every rank joins
the torch.distributed group (gloo on CPU, nccl on CUDA with one GPU per rank), loads its
shard and allocates its KV cache; the block count is the minimum over the ranks.

Each step the driver broadcasts a StepMessage (one pickle on the gloo CPU group): the
step's requests as deltas, each request's prompt and sampling parameters only when it is
first scheduled (step_messages.py), so its size does not grow with context. Then it runs
its own rank; workers rebuild the step's SchedulerOutput from what they keep, run it and
throw their logits away. A `None` broadcast stops the workers.

Failure: a worker that dies breaks the next collective (gloo reports the closed
connection; the driver raises) and `check_health` sees it between steps, so the engine
core fails loudly instead of waiting. Any step that fails on the driver breaks the group
for good (the ranks may be at different collectives): every later execute and
check_health raises WorkerDiedError, so the core exits rather than stepping out of step.
A worker whose driver is gone exits by itself.

Several nodes (config.nnodes > 1): this executor starts node 0's ranks; every other node
runs its own (executor/node.py, `pinnace serve --node-rank R`), joining the same group at
master_addr:master_port. Their death shows in their heartbeats (executor/node_health.py).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import ModelRunnerOutput, SchedulerOutput
from pinnace.runtime.distributed.parallel_state import (
    ParallelGroup,
    destroy_group,
    free_port,
    init_group,
)
from pinnace.runtime.engine.setup import build_engine_parts, resolve_device
from pinnace.runtime.executor.executor import Executor, WorkerDiedError
from pinnace.runtime.executor.node_health import RemoteNodes
from pinnace.runtime.executor.step_messages import StepDecoder, StepEncoder
from pinnace.runtime.worker.model_runner import ModelRunner

logger = logging.getLogger("pinnace.runtime")

PARENT_POLL_S = 1.0


class GroupExecutor(Executor):
    """The driver's side of a running group whose other ranks wait in `run_worker`: sends
    them the config, loads its own shard, then broadcasts every step."""

    def __init__(
        self, config: EngineConfig, group: ParallelGroup, workers: list[BaseProcess]
    ) -> None:
        self.group, self.workers = group, workers
        self.world_size = group.world_size
        self._stopped = False
        # Why the group cannot step any more: a step failed part-way, so the ranks may be
        # at different collectives (the next ones would pair up wrongly: a hang, or wrong
        # activations). Once set, execute and check_health always raise.
        self.broken: str | None = None
        self.encoder = StepEncoder()  # what the workers keep of the running requests
        group.broadcast_object(config)
        self.parts = build_engine_parts(config, group)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.check_health()
        try:
            self.group.broadcast_object(self.encoder.encode(sched))
            return self.parts.runner.execute(sched)
        except BaseException as exc:  # any failure part-way: the ranks may be out of step
            self.broken = f"a tensor-parallel step failed on the driver: {exc!r}"
            if not isinstance(exc, Exception):
                raise
            self.check_health()  # a dead worker is the better message
            raise WorkerDiedError(f"{self.broken}; the engine cannot step any more.") from exc

    def check_health(self) -> None:
        for proc in self.workers:
            if not proc.is_alive():
                raise WorkerDiedError(
                    f"worker {proc.name} (pid {proc.pid}) exited with status {proc.exitcode}: "
                    "the engine cannot run without all its ranks."
                )
        if self.broken is not None:
            raise WorkerDiedError(f"{self.broken}; the engine cannot step any more.")

    def abandon(self, reason: str) -> None:
        self.broken = self.broken or reason

    def _in_step(self) -> bool:
        """Whether the workers wait for a broadcast (alive, and no step failed part-way)."""
        return self.broken is None and all(p.is_alive() for p in self.workers)

    def shutdown(self) -> None:
        """The workers leave this engine's step loop (see run_worker); a broken group's
        are not told (they may wait in another collective): their starter kills them."""
        if not self._stopped and self._in_step():
            self.group.broadcast_object(None)
        self._stopped = True


class MultiprocExecutor(GroupExecutor):
    """Starts the group: spawns this node's ranks 1..N-1 and joins as rank 0."""

    def __init__(self, config: EngineConfig) -> None:
        addr = config.master_addr or "127.0.0.1"
        port = config.master_port or free_port(addr)
        device = rank_device(config, 0)
        limit_cpu_threads(config, device)
        workers = spawn_ranks(config, range(1, config.local_world_size), addr, port)
        # Other nodes' ranks (a multi-node group): watched through their heartbeats.
        self.nodes: RemoteNodes | None = None
        try:
            group = init_group(0, config.world_size, config.tensor_parallel_size, addr, port,
                               device, config.nnodes)  # fmt: skip
            if config.nnodes > 1:
                self.nodes = RemoteNodes(addr, port, config.nnodes)
            super().__init__(config, group, workers)
        except BaseException:
            kill_ranks(workers)
            destroy_group()
            raise
        logger.info("%d ranks ready (worker pids %s)", self.world_size,
                    [p.pid for p in self.workers])  # fmt: skip

    def check_health(self) -> None:
        super().check_health()
        if self.nodes is not None:
            self.nodes.check()

    def _in_step(self) -> bool:
        if not super()._in_step():
            return False
        try:
            if self.nodes is not None:
                self.nodes.check()
        except WorkerDiedError:
            return False
        return True

    def shutdown(self) -> None:
        if self._stopped:
            return
        try:
            in_step = self._in_step()
            super().shutdown()
            if in_step:
                self.group.broadcast_object(None)  # no next engine: the workers exit
                for proc in self.workers:
                    proc.join(timeout=10)
                if self.nodes is not None:  # the store lives until they read the None
                    self.nodes.wait_closed()
        finally:
            kill_ranks(self.workers)
            destroy_group()


@contextlib.contextmanager
def _may_have_children() -> Iterator[None]:
    """Let a daemonic process (the server's engine core is one) start the ranks.

    multiprocessing refuses children to daemons because a terminated daemon cannot reap
    them; our ranks do not need that: each exits by itself once its driver is gone
    (_exit_with_parent), and the driver kills them on shutdown or failure."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    was = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = was


def spawn_ranks(config: EngineConfig, ranks: range, addr: str, port: int) -> list[BaseProcess]:
    """This node's `ranks`, each in a spawned process, once every one is about to join."""
    ctx = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    joining: list[Connection] = []
    for rank in ranks:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=run_worker,
            args=(config, rank, addr, port, os.getpid(), sender),
            name=f"pinnace-rank-{rank}",
            daemon=True,
        )
        with _may_have_children():
            proc.start()
        sender.close()
        workers.append(proc)
        joining.append(receiver)
    try:
        wait_joining(joining, workers)
    except BaseException:
        kill_ranks(workers)
        raise
    return workers


def wait_joining(joining: list[Connection], workers: list[BaseProcess]) -> None:
    """Until every worker is about to join the group: one that dies first (an import
    error, an unguarded script) is reported now, not as a rendezvous timeout."""
    pending = dict(zip(joining, workers, strict=True))
    while pending:
        wait([*pending, *(p.sentinel for p in pending.values())])
        for conn, proc in list(pending.items()):
            if conn.poll():
                try:
                    conn.recv()
                except EOFError:  # closed unsent: the process is ending
                    proc.join(timeout=5)
                    raise WorkerDiedError(_start_failure(proc)) from None
                del pending[conn]
            elif not proc.is_alive():
                raise WorkerDiedError(_start_failure(proc))


def kill_ranks(workers: list[BaseProcess]) -> None:
    for proc in workers:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)


def _start_failure(proc: BaseProcess) -> str:
    return (
        f"worker {proc.name} exited with status {proc.exitcode} before joining the group "
        "(see its log above; a script that starts an engine with more than one rank needs "
        'an `if __name__ == "__main__":` guard: each rank\'s process re-imports it).'
    )


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """A rank's device: on CUDA its own GPU of the node (cuda:<local rank>)."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        return torch.device("cuda", rank % config.local_world_size)
    return device


def limit_cpu_threads(config: EngineConfig, device: torch.device) -> None:
    """On CPU the ranks share the cores this process may run on (its affinity mask, which
    a container's cpuset sets; or config.num_threads): each takes its share."""
    if device.type == "cpu":
        total = config.num_threads or _usable_cpus()
        torch.set_num_threads(max(1, total // config.local_world_size))


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS: no affinity masks


def run_worker(
    config: EngineConfig, rank: int, addr: str, port: int, driver_pid: int, joining: Connection
) -> None:
    """A worker rank's process: join the group (`config`'s), then per engine the driver
    starts (its config broadcast) load the shard and run every broadcast step until a
    None; a None instead of a config ends the process. (The engine core starts one
    engine per group; tests run several engines on one group.)"""
    # The engine core ignores SIGINT/SIGTERM (its server drains first); a spawned child
    # inherits that, so restore the defaults: the driver's terminate() must stop us.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s (rank {rank}): %(message)s"
    )
    _exit_with_parent(driver_pid)
    device = rank_device(config, rank)
    limit_cpu_threads(config, device)
    joining.send(rank)
    joining.close()
    group = init_group(
        rank, config.world_size, config.tensor_parallel_size, addr, port, device, config.nnodes
    )
    serve_engines(group)
    destroy_group()


def serve_engines(group: ParallelGroup) -> None:
    """A worker rank's life in a group: per engine the driver starts (its config
    broadcast) load the shard and run every broadcast step until a None; returns at a
    None instead of a config (the driver closes the group)."""
    while (engine := group.broadcast_object()) is not None:
        parts = build_engine_parts(engine, group)
        _serve(group, parts.runner)
        del parts


def _serve(group: ParallelGroup, runner: ModelRunner) -> None:
    decoder = StepDecoder()  # this engine's running requests
    while True:
        msg = group.broadcast_object()
        if msg is None:
            return
        runner.execute(decoder.decode(msg))


def _exit_with_parent(driver_pid: int) -> None:
    """A daemon thread that ends this process once the driver is gone (a killed driver
    leaves its workers blocked in a collective that may never fail, e.g. with nccl)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != driver_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
