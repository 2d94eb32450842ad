"""The rank group one engine runs on, over torch.distributed.

Process groups as vLLM keeps them: `device_group` for the tensor-parallel collectives of
this rank's stage (nccl on CUDA, gloo on CPU), `tp_cpu_group` the same ranks on gloo, and
`cpu_group` (always gloo, every rank) for Python objects, e.g. each step's SchedulerOutput
broadcast from the driver (rank 0). Pipeline stages talk point to point (send/recv on the
default group). Layers never reach a global: the model builder hands each sharded layer
this object.

Rank layout (vLLM's: tensor-parallel innermost), e.g. tp=2 x pp=2:

    rank      0  1 | 2  3
    pp_rank   0  0 | 1  1      stage 0: embedding + first layers; driver = rank 0
    tp_rank   0  1 | 0  1      stage 1: last layers + norm + LM head; output rank = 2

Rendezvous is torch.distributed's own: rank 0 hosts a TCPStore on master_addr:master_port
(node 0 in a multi-node group), every other rank, on this node or another, connects to it,
and init_process_group completes once all world_size ranks have. A group that does not
complete within the timeout is one RendezvousError line naming the address and the count.

Before that, rank 0 puts its layout (world size, tensor-parallel size, node count) in the
store and every other rank compares its own: a node started with other --nnodes or sizes
(say a worker against a leader not given --nnodes) exits at once with one line naming
both layouts, and leaves that line in the store, where rank 0, waiting for its ranks,
reads it and fails with it too, instead of both waiting out the rendezvous timeout.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A peer that neither answers nor dies fails the collective after this long (a hung
# worker must not hang the engine forever), and a group whose ranks do not all arrive
# fails the rendezvous after this long. Long enough for a slow model load, or for a
# LeaderWorkerSet's worker pods to be scheduled after their leader.
TIMEOUT_ENV = "PINNACE_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
JOINED_KEY = "pinnace/joined"  # ranks that reached the store with rank 0's layout
LAYOUT_KEY = "pinnace/layout"  # rank 0's world size, tensor-parallel size and node count
REFUSED_KEY = "pinnace/refused"  # why a rank with another layout did not join (one line)


class RendezvousError(RuntimeError):
    """The group did not complete: a rank never arrived, or the store was unreachable."""


def distributed_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


@dataclass
class ParallelGroup:
    """This process's place in the group: rank, its pipeline stage and tensor slice."""

    rank: int
    world_size: int
    tp_size: int
    device_group: Any = None  # dist.ProcessGroup; None when world_size == 1
    cpu_group: Any = None
    tp_cpu_group: Any = None  # None: cpu_group (one stage: the stage is the world)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def output_rank(self) -> int:
        """The rank whose logits the driver samples: the last stage's tensor rank 0."""
        return (self.pp_size - 1) * self.tp_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel ranks, in place."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the tensor-parallel ranks, in place."""
        if self.tp_size > 1:
            on_cpu = x.device.type == "cpu"  # quantized models are assembled on the CPU
            group = (self.tp_cpu_group or self.cpu_group) if on_cpu else self.device_group
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., tp * n], rank-major."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest `value` over all ranks (e.g. KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def max_int(self, value: int) -> int:
        """The largest `value` over all ranks."""
        return -self.min_int(-value)

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's `value`, in rank order (e.g. each rank's weight bytes, logged)."""
        parts = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(parts, torch.tensor([value], dtype=torch.long), group=self.cpu_group)
        return [int(p.item()) for p in parts]

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Point to point to global rank `dst` (activations between pipeline stages)."""
        dist.send(x.contiguous(), dst)

    def recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int
    ) -> torch.Tensor:
        """The tensor global rank `src` sends; its shape and dtype both sides know."""
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src)
        return x

    def send_object(self, obj: object, dst: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()], dtype=torch.long), dst, group=self.cpu_group)
        dist.send(data, dst, group=self.cpu_group)

    def recv_object(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.long)
        dist.recv(size, src, group=self.cpu_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src, group=self.cpu_group)
        return pickle.loads(data.numpy().tobytes())

    def broadcast_object(self, obj: object = None) -> Any:
        """The driver's `obj` on every rank (pickled once, sent as one byte tensor)."""
        if self.is_driver:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src=0, group=self.cpu_group)
        if not self.is_driver:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.cpu_group)
        return obj if self.is_driver else pickle.loads(data.numpy().tobytes())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_group(
    rank: int,
    world_size: int,
    tp_size: int,
    addr: str,
    port: int,
    device: torch.device,
    nnodes: int = 1,
) -> ParallelGroup:
    """Join the group (blocks until all ranks arrived) and return this rank's view.

    On CUDA `device` is this rank's own GPU (cuda:<local rank>): it becomes the current
    device first, so nccl does not put every rank's communicator on GPU 0."""
    timeout = distributed_timeout()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    store = _connect_store(rank, world_size, addr, port, timeout)
    layout = _layout(world_size, tp_size, nnodes)
    if rank == 0:
        store.set(LAYOUT_KEY, layout)
    else:
        _check_layout(store, rank, layout, addr, port)
    store.add(JOINED_KEY, 1)
    if rank == 0:
        _await_ranks(store, world_size, addr, port, timeout)
    # torch names a group's store keys by a per-process counter that a failed join leaves
    # advanced; a later join from this process (LLM(...) again after a failed start) would
    # then wait on keys no fresh peer writes. Put it back on failure.
    world_state = dist.distributed_c10d._world
    group_count = world_state.group_count
    try:
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    except dist.DistError as exc:
        world_state.group_count = group_count
        raise _incomplete(rank, addr, port, timeout, _joined(store), world_size,
                          _first_line(exc)) from None  # fmt: skip
    world = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else world
    if world_size == tp_size:  # one stage: its tensor group is the world
        return ParallelGroup(rank, world_size, tp_size, world, cpu_group)
    # One tensor group per stage; every rank creates every group, in the same order.
    device_group = tp_cpu_group = None
    for stage in range(world_size // tp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        dev = dist.new_group(ranks, timeout=timeout)
        cpu = dist.new_group(ranks, backend="gloo", timeout=timeout) if backend != "gloo" else dev
        if rank in ranks:
            device_group, tp_cpu_group = dev, cpu
    return ParallelGroup(rank, world_size, tp_size, device_group, cpu_group, tp_cpu_group)


def _connect_store(
    rank: int, world_size: int, addr: str, port: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """Rank 0 hosts the store (listening on every interface), the others connect to it."""
    try:
        return dist.TCPStore(
            addr, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False
        )
    except dist.DistError as exc:
        what = "host the store on port" if rank == 0 else "reach rank 0's store at"
        raise RendezvousError(
            f"rank {rank} could not {what} {addr}:{port} within "
            f"{timeout.total_seconds():.0f} s (is node 0 started, and are --master-addr/"
            f"--master-port or $LWS_LEADER_ADDRESS its address?): {_first_line(exc)}"
        ) from None


def _layout(world_size: int, tp_size: int, nnodes: int) -> str:
    return (
        f"{world_size} ranks (tensor-parallel {tp_size} x pipeline-parallel "
        f"{world_size // tp_size}) on {nnodes} node{'s' if nnodes > 1 else ''}"
    )


def _check_layout(store: dist.TCPStore, rank: int, layout: str, addr: str, port: int) -> None:
    """A rank other than 0: join only a group of the layout it was started for; else
    leave rank 0 the reason and fail with it."""
    store.wait([LAYOUT_KEY])  # rank 0 sets it as soon as it hosts the store
    leader = store.get(LAYOUT_KEY).decode()
    if leader == layout:
        return
    why = (
        f"rank {rank} was started for {layout} but rank 0 at {addr}:{port} runs {leader}; "
        "start every node with the same --nnodes, --tensor-parallel-size and "
        "--pipeline-parallel-size"
    )
    store.set(REFUSED_KEY, why)
    raise RendezvousError(why)


def _await_ranks(
    store: dist.TCPStore, world_size: int, addr: str, port: int, timeout: datetime.timedelta
) -> None:
    """Rank 0: wait until every rank reached the store with this layout, failing at once
    when one refused it (init_process_group would wait out the timeout)."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        if store.check([REFUSED_KEY]):
            raise RendezvousError(
                f"rank 0: the group at {addr}:{port} cannot complete: "
                f"{store.get(REFUSED_KEY).decode()}"
            )
        joined = store.add(JOINED_KEY, 0)
        if joined >= world_size:
            return
        if time.monotonic() > deadline:
            raise _incomplete(0, addr, port, timeout, str(joined), world_size, "timed out")
        time.sleep(0.02)


def _incomplete(
    rank: int,
    addr: str,
    port: int,
    timeout: datetime.timedelta,
    joined: str,
    world_size: int,
    cause: str,
) -> RendezvousError:
    return RendezvousError(
        f"rank {rank}: the group at {addr}:{port} did not complete within "
        f"{timeout.total_seconds():.0f} s ({joined} of {world_size} ranks arrived; every "
        "node must start with the same --nnodes and --tensor-parallel-size x "
        f"--pipeline-parallel-size, and ${TIMEOUT_ENV} sets the wait): {cause}"
    )


def _joined(store: dist.TCPStore) -> str:
    try:
        return str(store.add(JOINED_KEY, 0))
    except dist.DistError:
        return "?"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
