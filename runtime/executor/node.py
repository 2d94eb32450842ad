"""A node of a multi-node group other than node 0: `pinnace serve --node-rank R` (R > 0).

Headless, like vLLM's `--headless` workers: no API server, only this node's ranks,
world ranks R * local .. R * local + local - 1 (local = world_size / nnodes). The first
runs in this process, the others in spawned processes (as node 0's executor spawns its
own). They join rank 0's group at master_addr:master_port and take each engine's config
and steps from its broadcasts (multiproc.serve_engines), so the scheduler-broadcast
contract is the single-node one.

The node lives as long as its leader: when the leader closes the group (its server
stopped) the node exits 0; when the leader's process is gone (its store with it) or one
of this node's ranks dies, exit 1 (node_health.LeaderWatch). A group that never completes
is one line and exit 1 after the rendezvous timeout; a leader started with another
layout (--nnodes, sizes) is one line and exit 1 at once (parallel_state.init_group).
"""

from __future__ import annotations

import logging
import sys

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.distributed.parallel_state import (
    RendezvousError,
    destroy_group,
    init_group,
)
from pinnace.runtime.executor.executor import WorkerDiedError
from pinnace.runtime.executor.multiproc import (
    kill_ranks,
    limit_cpu_threads,
    rank_device,
    serve_engines,
    spawn_ranks,
)
from pinnace.runtime.executor.node_health import LeaderWatch

logger = logging.getLogger("pinnace.runtime")


def run_worker_node(config: EngineConfig) -> int:
    """Run this node's ranks until the leader closes the group (0) or fails (1)."""
    assert config.master_addr is not None and config.master_port is not None  # nnodes > 1
    addr, port = config.master_addr, config.master_port
    local = config.local_world_size
    first = config.node_rank * local
    device = rank_device(config, first)
    limit_cpu_threads(config, device)
    logger.info(
        "Node %d of %d: ranks %d..%d, joining the group at %s:%d (no API server here)",
        config.node_rank, config.nnodes, first, first + local - 1, addr, port,
    )  # fmt: skip
    ranks = spawn_ranks(config, range(first + 1, first + local), addr, port)
    try:
        group = init_group(first, config.world_size, config.tensor_parallel_size, addr, port,
                           device, config.nnodes)  # fmt: skip
    except (RendezvousError, WorkerDiedError) as exc:
        kill_ranks(ranks)
        print(f"pinnace serve: error: {exc}", file=sys.stderr)
        return 1
    watch = LeaderWatch(addr, port, config.node_rank, ranks).start()
    try:
        serve_engines(group)
    except Exception as exc:  # the leader or a peer failed mid-step (or this rank did)
        watch.closing.set()
        kill_ranks(ranks)
        logger.exception("node %d: the group failed", config.node_rank)
        print(f"pinnace serve: error: node {config.node_rank}: the group failed: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    watch.close()  # the leader closed the group: it waits for this before going
    for proc in ranks:
        proc.join(timeout=10)
    kill_ranks(ranks)
    destroy_group()
    logger.info("The leader closed the group: node %d exits", config.node_rank)
    return 0
