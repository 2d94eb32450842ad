"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed on the persistent
input buffers.

A decode step of B requests runs as the graph of the smallest bucket >= B; the B real
requests come first and the rest are padding (input_batch.py: a dummy token whose K/V goes
to the pad slot of a block no request owns, never sampled). Capture happens once at start,
largest bucket first, all graphs sharing one memory pool; a replay reads input_ids,
positions and slot_mapping at the InputBatch's fixed addresses and the attention backend's
per-bucket buffers (FlashInfer's CUDA-graph decode wrappers, planned on the host before each
replay). Steps with a prefill chunk, proposals to verify, LoRA adapters or LongRoPE offsets
run eagerly.

    bucket_for(B):  1 2 4 8 16 24 32 ... max_num_seqs  (vLLM's sizes)
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from pinnace.runtime.layers.attention.backend import AttentionBackend
from pinnace.runtime.layers.forward_context import ForwardContext, forward_context
from pinnace.runtime.worker.input_batch import InputBatch, StepInputs

logger = logging.getLogger("pinnace.runtime")

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes up to max_num_seqs (capped at 512): 1, 2, 4, then multiples of 8, and
    max_num_seqs itself so every decode batch has a bucket."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def graph_memory_estimate(sizes: list[int], hidden_size: int, intermediate_size: int) -> int:
    """Bytes the graphs' shared pool is expected to take (reserved out of the KV budget):
    the activations of the largest bucket's forward in float32-wide buffers, a margin for
    per-graph allocations, and FlashInfer's per-bucket page-table buffers."""
    largest = max(sizes)
    activations = largest * (6 * hidden_size + 3 * intermediate_size) * 4
    return 64 * 2**20 + 4 * activations + len(sizes) * 2**20


class Graph(Protocol):
    """What the runner needs of a captured graph (torch.cuda.CUDAGraph on CUDA)."""

    def replay(self) -> None: ...


# (function to capture) -> (graph, its output); on CUDA, capture_cuda_graph below.
CaptureFn = Callable[[Callable[[], torch.Tensor]], tuple[Graph, torch.Tensor]]


class CUDAGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        input_batch: InputBatch,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        capture: CaptureFn,
    ) -> None:
        if not backend.supports_cuda_graphs:
            raise ValueError(f"attention backend {backend.name} cannot run in CUDA graphs")
        self.model, self.backend, self.input_batch = model, backend, input_batch
        self.kv_caches, self.sizes, self._capture = kv_caches, sorted(sizes), capture
        self._graphs: dict[int, tuple[Graph, torch.Tensor]] = {}
        # Every page a bucket may plan: the cache's blocks, plus one per padded row.
        num_blocks = input_batch.pad_slot // input_batch.block_size
        backend.builder.configure_graphs(self.max_size, num_blocks + 1 + self.max_size)

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket_for(self, query_lens: list[int], eager_only: bool) -> int | None:
        """The bucket of a decode step of len(query_lens) requests; None: run eagerly."""
        num_reqs = len(query_lens)
        if eager_only or num_reqs > self.max_size or any(n != 1 for n in query_lens):
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_reqs)]

    def capture_all(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse the shared pool)."""
        for size in reversed(self.sizes):
            step = self.input_batch.prepare([], num_padded=size)  # all padding
            # Planning is host work: before capture, never inside (FlashInfer's rule too).
            meta = self._plan(step, size)
            self._graphs[size] = self._capture(functools.partial(self._forward, step, meta))

    def run(self, step: StepInputs, bucket: int) -> torch.Tensor:
        """Hidden states [bucket, hidden] of a padded decode step (plan, then replay)."""
        self._plan(step, bucket)
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return hidden

    def _plan(self, step: StepInputs, bucket: int) -> Any:
        return self.backend.builder.build(step.layout, graph_bucket=bucket)

    def _forward(self, step: StepInputs, metadata: Any) -> torch.Tensor:
        ctx = ForwardContext(self.backend, metadata, self.kv_caches)
        with forward_context(ctx):
            hidden: torch.Tensor = self.model(step.input_ids, step.positions)
        return hidden


def capture_cuda_graph(pool: Any) -> CaptureFn:
    """A CaptureFn for CUDA: warm up once eagerly (lazy inits, autotuning), then capture
    into the shared `pool` (torch.cuda.graph_pool_handle())."""

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    return capture


def capture_decode_graphs(
    model: nn.Module,
    backend: AttentionBackend,
    input_batch: InputBatch,
    kv_caches: list[torch.Tensor],
    sizes: list[int],
    reserved_bytes: int,
) -> CUDAGraphRunner | None:
    """Capture every bucket on CUDA; None (decode runs eagerly, with a warning saying why)
    when capture fails, e.g. for a model with host syncs in its forward."""
    device = kv_caches[0].device
    runner = CUDAGraphRunner(
        model, backend, input_batch, kv_caches, sizes,
        capture_cuda_graph(torch.cuda.graph_pool_handle()),
    )  # fmt: skip
    before, start = torch.cuda.memory_reserved(device), time.perf_counter()
    try:
        with torch.inference_mode():
            runner.capture_all()
    except RuntimeError as e:
        logger.warning("CUDA graph capture failed, decode steps run eagerly: %s", e)
        return None
    used = torch.cuda.memory_reserved(device) - before
    logger.info(
        "CUDA graphs for decode batch sizes %d..%d (%d graphs) captured in %.1f s, "
        "%.0f MiB (%.0f MiB set aside from the KV budget); --enforce-eager turns them off",
        sizes[0], sizes[-1], len(sizes), time.perf_counter() - start, used / 2**20,
        reserved_bytes / 2**20,
    )  # fmt: skip
    if used > reserved_bytes:
        logger.warning(
            "CUDA graphs took %.0f MiB, more than the %.0f MiB set aside; lower "
            "--gpu-memory-utilization if memory runs short",
            used / 2**20, reserved_bytes / 2**20,
        )  # fmt: skip
    return runner
