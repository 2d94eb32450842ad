"""The rank group one engine runs on, over torch.distributed.

Two process groups, as vLLM keeps them: `device_group` for tensor collectives (nccl on
CUDA, gloo on CPU) and `cpu_group` (always gloo) for Python objects, e.g. each step's
SchedulerOutput broadcast from the driver (rank 0). Layers never reach a global: the
model builder hands each sharded layer this object.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A peer that neither answers nor dies fails the collective after this long (a hung
# worker must not hang the engine forever). Long enough for a slow model load.
TIMEOUT_ENV = "PINNACE_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class ParallelGroup:
    """This process's place in the group: rank, and its tensor-parallel slice."""

    rank: int
    world_size: int
    tp_size: int
    device_group: Any = None  # dist.ProcessGroup; None when world_size == 1
    cpu_group: Any = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

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
            group = self.cpu_group if on_cpu else self.device_group
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
    rank: int, world_size: int, tp_size: int, addr: str, port: int, device: torch.device
) -> ParallelGroup:
    """Join the group (blocks until all ranks arrived) and return this rank's view.

    On CUDA `device` is this rank's own GPU (cuda:<local rank>): it becomes the current
    device first, so nccl does not put every rank's communicator on GPU 0."""
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return ParallelGroup(rank, world_size, tp_size, dist.group.WORLD, cpu_group or dist.group.WORLD)


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
