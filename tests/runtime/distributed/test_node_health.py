"""Multi-node liveness and rendezvous, in-process: heartbeats through a real TCPStore, the
close handshake, and the one-line errors of a group that never completes."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator

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
