"""Multi-node liveness and rendezvous: heartbeats through a real TCPStore, the close
handshake, and the one-line errors of a group that never completes (in-process), or whose
worker node was started with another layout than its leader (a real `pinnace serve`)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pinnace.runtime.distributed.parallel_state import (
    TIMEOUT_ENV,
    RendezvousError,
    free_port,
    init_group,
)
from pinnace.runtime.executor import node_health
from pinnace.runtime.executor.executor import WorkerDiedError
from pinnace.runtime.executor.node_health import NODE_TIMEOUT_ENV, LeaderWatch, RemoteNodes


def _leader_store() -> tuple[dist.TCPStore, int]:
    """Rank 0's store, as init_group hosts it."""
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=5),
        wait_for_workers=False,
    )  # fmt: skip
    return store, port


@pytest.fixture
def leader_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dist.TCPStore, int]]:
    monkeypatch.setattr(node_health, "BEAT_S", 0.2)  # beats 5x faster: a quick test
    monkeypatch.setattr(node_health, "CHECK_EVERY_S", 0.0)  # every check reads the store
    yield _leader_store()


def _until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def test_heartbeats_keep_a_node_alive_and_the_close_is_confirmed(
    leader_store: tuple[dist.TCPStore, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = leader_store
    monkeypatch.setenv(NODE_TIMEOUT_ENV, "0.6")
    lost: list[str] = []
    nodes = RemoteNodes("127.0.0.1", port, nnodes=2)
    watch = LeaderWatch("127.0.0.1", port, 1, on_lost=lambda code, why: lost.append(why))
    watch.start()
    for _ in range(6):  # 1.2 s: twice the timeout, alive throughout
        nodes.check()
        time.sleep(0.2)
    started = time.monotonic()
    watch.close()
    nodes.wait_closed()  # returns at once: the node said so
    assert time.monotonic() - started < 1.5
    assert lost == []
    nodes.check()  # sees the last beats
    time.sleep(0.8)  # no beats any more: now it reads as dead
    with pytest.raises(WorkerDiedError, match="node 1 sent no heartbeat"):
        nodes.check()


def test_a_node_whose_rank_died_is_reported_by_name(
    leader_store: tuple[dist.TCPStore, int],
) -> None:
    _, port = leader_store

    class DeadRank:
        name, exitcode = "pinnace-rank-3", -9

        def is_alive(self) -> bool:
            return False

    lost: list[tuple[int, str]] = []
    nodes = RemoteNodes("127.0.0.1", port, nnodes=2)
    watch = LeaderWatch("127.0.0.1", port, 1, [DeadRank()], lambda c, w: lost.append((c, w)))  # type: ignore[list-item]
    watch.start()
    assert _until(lambda: lost, 5)
    assert lost == [(1, "rank process pinnace-rank-3 exited with status -9")]
    with pytest.raises(WorkerDiedError, match="node 1 failed: rank process pinnace-rank-3"):
        nodes.check()


def test_a_node_exits_when_its_leader_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_health, "BEAT_S", 0.2)
    store, port = _leader_store()
    lost: list[tuple[int, str]] = []
    watch = LeaderWatch("127.0.0.1", port, 1, on_lost=lambda c, w: lost.append((c, w)))
    watch.start()
    time.sleep(0.2)
    del store  # rank 0's process ended: its store with it
    assert _until(lambda: lost, 5)
    [(code, why)] = lost
    assert code == 1 and f"127.0.0.1:{port} is gone" in why


def test_a_group_that_never_completes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    port = free_port()
    started = time.monotonic()
    groups_before = torch.distributed.distributed_c10d._world.group_count
    with pytest.raises(RendezvousError) as leader:  # rank 0 waits for a rank that never comes
        init_group(0, 2, 2, "127.0.0.1", port, torch.device("cpu"))
    message = str(leader.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "1 of 2 ranks arrived" in message
    # torch's group counter names the store keys: left advanced, this process's next join
    # would wait on keys a fresh peer never writes (the next test module's group hung so).
    assert torch.distributed.distributed_c10d._world.group_count == groups_before
    port = free_port()
    with pytest.raises(RendezvousError) as worker:  # a node with no leader to reach
        init_group(1, 2, 2, "127.0.0.1", port, torch.device("cpu"))
    message = str(worker.value)
    assert "\n" not in message and f"reach rank 0's store at 127.0.0.1:{port}" in message
    assert time.monotonic() - started < 15


def test_a_worker_node_against_a_leader_without_nnodes_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The leader (here in-process, as a TP=2 engine without --nnodes hosts it) and a real
    worker node `pinnace serve --nnodes 2 --node-rank 1`: both fail with one line naming the
    two layouts, well within the rendezvous timeout (20 s here, 600 s by default)."""
    monkeypatch.setenv(TIMEOUT_ENV, "20")
    port = free_port()
    failed: list[BaseException] = []

    def leader() -> None:
        try:
            init_group(0, 2, 2, "127.0.0.1", port, torch.device("cpu"))  # nnodes=1
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=leader, daemon=True)
    thread.start()
    started = time.monotonic()
    worker = subprocess.run(
        [str(Path(sys.executable).with_name("pinnace")), "serve", str(tmp_path),
         "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port)],
        capture_output=True, text=True, timeout=60, env={**os.environ, TIMEOUT_ENV: "20"},
    )  # fmt: skip
    thread.join(timeout=10)
    assert time.monotonic() - started < 15
    errors = [line for line in worker.stderr.splitlines() if "error" in line]
    assert worker.returncode == 1, worker.stderr
    assert errors == [
        "pinnace serve: error: rank 1 was started for 2 ranks (tensor-parallel 2 x "
        "pipeline-parallel 1) on 2 nodes but rank 0 at 127.0.0.1:"
        f"{port} runs 2 ranks (tensor-parallel 2 x pipeline-parallel 1) on 1 node; start "
        "every node with the same --nnodes, --tensor-parallel-size and "
        "--pipeline-parallel-size"
    ], worker.stderr
    [exc] = failed
    assert isinstance(exc, RendezvousError) and "\n" not in str(exc)
    assert str(exc).startswith(f"rank 0: the group at 127.0.0.1:{port} cannot complete: ")
    assert "on 2 nodes but rank 0" in str(exc)
