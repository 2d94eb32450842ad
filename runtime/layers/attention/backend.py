"""Attention backends: how a step's queries read the paged KV cache, and how it is laid out.

A backend owns three things (vLLM v1's split):

    kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)   one layer's K/V tensor
    metadata builder: BatchLayout -> the backend's metadata, once per step
    forward(q, k, v, kv_cache, metadata, ...): write the step's K/V, then attend, per layer

The worker allocates what `kv_cache_shape` asks for and never looks inside. Invariant every
backend keeps: all of a layer's K/V writes for the step land before any query of the step
reads, so a request may reuse blocks another request fills in the same step (prefix hits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BatchLayout:
    """Per-step batch description shared by all backends (host-side lists + device tensors).

    Slots and block ids are the shared vocabulary: slot = block_id * block_size + offset.
    Tokens of all requests are flattened: request b owns rows
    query_start_loc[b] : query_start_loc[b + 1] of q/k/v.

    The tensor fields come from the persistent input batch (worker/input_batch.py); when
    set, builders read them instead of building tensors from the lists.
    """

    query_lens: list[int]
    num_computed_tokens: list[int]  # KV already in the cache before this step
    block_tables: list[list[int]]
    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    device: torch.device
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32, row b = request b
    query_start_loc: torch.Tensor | None = None  # [B + 1] int32 on the device
    seq_lens_tensor: torch.Tensor | None = None  # [B] int32 on the device
    # Host copies of the three above (the same tensors on CPU), for planning on the host.
    block_table_cpu: torch.Tensor | None = None
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.num_computed_tokens, self.query_lens, strict=True)]

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every request has exactly one query token this step."""
        return all(n == 1 for n in self.query_lens)


@dataclass(frozen=True)
class LayerParams:
    """What differs between attention layers of one model (Gemma 2/3 alternate windows)."""

    scale: float
    sliding_window: int | None = None  # keys within the last W positions, the query's own in
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap)


@dataclass(frozen=True)
class AttentionSpec:
    """The model's attention geometry, which backends plan and allocate for."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype  # of q/k/v
    kv_cache_dtype: torch.dtype  # of the cache (float8_e4m3fn: fp8_kv.py's scaled storage)
    layers: tuple[LayerParams, ...] = ()  # one per attention layer, in layer order

    @property
    def distinct_layer_params(self) -> list[LayerParams]:
        return list(dict.fromkeys(self.layers))


class AttentionMetadataBuilder(ABC):
    """Turns a step's BatchLayout into a backend's metadata, once per step (not per layer)."""

    @abstractmethod
    def build(self, layout: BatchLayout, graph_bucket: int | None = None) -> Any:
        """`graph_bucket`: plan into that CUDA-graph bucket's fixed buffers (a padded decode
        step of exactly that many requests); only where the backend supports_cuda_graphs."""

    def configure_graphs(self, max_bucket: int, max_pages: int) -> None:
        """Allocate the buffers graph buckets plan into: up to `max_bucket` requests holding
        `max_pages` blocks in all."""
        raise NotImplementedError(f"{type(self).__name__} cannot plan for CUDA graphs")


class AttentionBackend(ABC):
    name: str
    builder: AttentionMetadataBuilder
    # The builder takes build(layout, graph_bucket=B) and plans into buffers at fixed
    # addresses per bucket, so a captured decode step can be replayed (worker/cuda_graphs.py).
    supports_cuda_graphs: bool = False

    @staticmethod
    @abstractmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """One layer's K/V tensor shape (vLLM's get_kv_cache_shape); its layout is private."""

    def build_metadata(self, layout: BatchLayout) -> Any:
        return self.builder.build(layout)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # kv_cache_shape(...)
        metadata: Any,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap)
    ) -> torch.Tensor:  # [T, H, D]
        ...

    def rope_decode(
        self,
        qkv: torch.Tensor,  # [T, (H + 2 * Hkv) * D] q | k | v, before rotary
        positions: torch.Tensor,  # [T] int64 rows of cos / sin
        cos: torch.Tensor,  # [P, D] float32 (RotaryEmbedding's tables)
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        num_heads: int,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor | None:  # [T, H, D]
        """Rotary, K/V write and attention of a decode step in one fused call, where this
        backend has one for the step (else None: the caller rotates and calls forward)."""
        return None
