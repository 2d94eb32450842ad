"""FlashInfer attention on CUDA: paged decode and prefill wrappers, planned once per step.

The cache of a layer is FlashInfer's NHD paged layout, one block per page:

    kv_cache  [num_blocks, 2, block_size, Hkv, D]     [:, 0] = K, [:, 1] = V
    write     slot s -> block s // bs, offset s % bs: row (block * 2 + K|V) * bs + offset
              of the [num_blocks * 2 * bs, Hkv, D] view

A step's requests are split (vLLM's split): the leading requests with one query token go
through the decode wrapper, the rest (prefill chunks, verification of proposals, decodes
after a prefill) through the prefill wrapper, so mixed prefill + decode steps run as one
step. Each wrapper is planned once per step (host work and small copies) per distinct
layer setting (scale, sliding window, soft cap: Gemma 2/3 alternate two), and run per layer.

`flashinfer` is imported lazily (the `gpu` extra). CI runs this module against a torch
implementation of the same wrapper API (tests/runtime/flashinfer_reference.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from pinnace.runtime.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    AttentionSpec,
    BatchLayout,
    LayerParams,
)
from pinnace.runtime.layers.attention.fp8_kv import FP8_KV_DTYPE, KV_FP8_SCALE, write_kv

WORKSPACE_BYTES = 128 * 1024**2  # FlashInfer's recommended float workspace
SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def import_flashinfer() -> ModuleType:
    """The flashinfer module (raises ImportError when the `gpu` extra is missing)."""
    return importlib.import_module("flashinfer")


def unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why FlashInfer cannot serve this model (None: it can)."""
    if spec.head_size not in SUPPORTED_HEAD_SIZES:
        return f"head size {spec.head_size} is not one of {SUPPORTED_HEAD_SIZES}"
    if spec.dtype not in SUPPORTED_DTYPES:
        return f"dtype {spec.dtype} (FlashInfer runs float16 / bfloat16)"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} KV heads"
    return None


@dataclass
class FlashInferMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int  # leading requests through the decode wrapper
    num_decode_tokens: int  # = num_decodes (one token each)
    block_size: int
    # per LayerParams: the planned wrappers (None where that part of the step is empty)
    decode: dict[LayerParams, Any] = field(default_factory=dict)
    prefill: dict[LayerParams, Any] = field(default_factory=dict)


@dataclass
class _PageTable:
    """FlashInfer's CSR page table of some requests: indptr/last_page_len on the host,
    indices on the device."""

    indptr: torch.Tensor  # [B + 1] int32 host
    indices: torch.Tensor  # [nnz_pages] int32 device
    last_page_len: torch.Tensor  # [B] int32 host


class FlashInferMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, spec: AttentionSpec, device: torch.device, flashinfer: ModuleType) -> None:
        self.spec, self.device, self.fi = spec, device, flashinfer
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.params = spec.distinct_layer_params or [LayerParams(spec.head_size**-0.5)]
        self._decode = {p: self._decode_wrapper() for p in self.params}
        self._prefill = {
            p: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            for p in self.params
        }
        # Per CUDA-graph bucket: decode wrappers planning into slices of shared buffers at
        # fixed addresses (one graph replays at a time; configure_graphs allocates them).
        self._graph_decode: dict[int, dict[LayerParams, Any]] = {}
        self._graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def configure_graphs(self, max_bucket: int, max_pages: int) -> None:
        i32, dev = torch.int32, self.device
        self._graph_buffers = (
            torch.zeros(max_bucket + 1, dtype=i32, device=dev),  # indptr
            torch.zeros(max_pages, dtype=i32, device=dev),  # indices
            torch.zeros(max_bucket, dtype=i32, device=dev),  # last_page_len
        )

    def _decode_wrapper(self, graph_bucket: int | None = None) -> Any:
        tensor_cores = self.spec.num_heads // self.spec.num_kv_heads >= 4  # vLLM's rule
        if graph_bucket is None:
            return self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=tensor_cores
            )
        if self._graph_buffers is None:
            raise RuntimeError("configure_graphs() before planning a CUDA-graph bucket")
        indptr, indices, last_page_len = self._graph_buffers
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=indptr[: graph_bucket + 1],
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len[:graph_bucket],
        )  # fmt: skip

    def build(self, layout: BatchLayout, graph_bucket: int | None = None) -> FlashInferMetadata:
        """Plan the step's wrappers. `graph_bucket`: plan the fixed-buffer decode wrappers of
        that CUDA-graph bucket (the step must be a decode step of exactly that many rows)."""
        query_lens = layout.query_lens
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        meta = FlashInferMetadata(layout.slot_mapping, num_decodes, num_decodes, layout.block_size)
        pages = _page_table(layout)
        if num_decodes:
            table = _slice(pages, 0, num_decodes)
            wrappers = self._decode if graph_bucket is None else self._graph_wrappers(graph_bucket)
            for p in self.params:
                self._plan_decode(wrappers[p], table, p, layout.block_size)
                meta.decode[p] = wrappers[p]
        if num_decodes < len(query_lens):
            if graph_bucket is not None:
                raise ValueError("a CUDA-graph step must be a decode step")
            table = _slice(pages, num_decodes, len(query_lens))
            qo = _query_indptr(layout)[num_decodes:]
            qo = qo - qo[0]
            for p in self.params:
                self._plan_prefill(self._prefill[p], qo, table, p, layout.block_size)
                meta.prefill[p] = self._prefill[p]
        return meta

    def _graph_wrappers(self, bucket: int) -> dict[LayerParams, Any]:
        if bucket not in self._graph_decode:
            self._graph_decode[bucket] = {p: self._decode_wrapper(bucket) for p in self.params}
        return self._graph_decode[bucket]

    def _common(self, p: LayerParams) -> dict[str, Any]:
        return dict(
            sm_scale=p.scale,
            window_left=-1 if p.sliding_window is None else p.sliding_window - 1,
            logits_soft_cap=p.softcap,
            q_data_type=self.spec.dtype,
            kv_data_type=self.spec.kv_cache_dtype,
        )

    def _plan_decode(self, wrapper: Any, t: _PageTable, p: LayerParams, page_size: int) -> None:
        s = self.spec
        wrapper.plan(
            t.indptr, t.indices, t.last_page_len, s.num_heads, s.num_kv_heads, s.head_size,
            page_size, pos_encoding_mode="NONE", **self._common(p),
        )  # fmt: skip

    def _plan_prefill(
        self, wrapper: Any, qo_indptr: torch.Tensor, t: _PageTable, p: LayerParams, page: int
    ) -> None:
        s = self.spec
        wrapper.plan(
            qo_indptr, t.indptr, t.indices, t.last_page_len, s.num_heads, s.num_kv_heads,
            s.head_size, page, causal=True, **self._common(p),
        )  # fmt: skip


def _query_indptr(layout: BatchLayout) -> torch.Tensor:
    if layout.query_start_loc_cpu is not None:
        return layout.query_start_loc_cpu.to(torch.int32)
    lens = torch.tensor([0, *layout.query_lens], dtype=torch.int32)
    return lens.cumsum(0, dtype=torch.int32)


def _page_table(layout: BatchLayout) -> _PageTable:
    """Pages of every request: ceil(seq_len / bs) leading entries of its block table row."""
    bs = layout.block_size
    if layout.seq_lens_cpu is not None:
        seq_lens = layout.seq_lens_cpu.to(torch.int32)
    else:
        seq_lens = torch.tensor(layout.seq_lens, dtype=torch.int32)
    num_pages = (seq_lens + bs - 1) // bs
    width = int(num_pages.max())
    if layout.block_table_cpu is not None:
        table = layout.block_table_cpu[:, :width]
    else:
        table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        for b, ids in enumerate(layout.block_tables):
            table[b, : min(len(ids), width)] = torch.tensor(ids[:width], dtype=torch.int32)
    used = torch.arange(width)[None, :] < num_pages[:, None]
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    torch.cumsum(num_pages, 0, out=indptr[1:])
    return _PageTable(
        indptr,
        table[used].to(torch.int32).to(layout.device, non_blocking=True),
        seq_lens - (num_pages - 1) * bs,
    )


def _slice(t: _PageTable, start: int, end: int) -> _PageTable:
    lo, hi = int(t.indptr[start]), int(t.indptr[end])
    return _PageTable(t.indptr[start : end + 1] - lo, t.indices[lo:hi], t.last_page_len[start:end])


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, spec: AttentionSpec, device: torch.device, flashinfer: ModuleType) -> None:
        self.spec = spec
        self.builder: FlashInferMetadataBuilder = FlashInferMetadataBuilder(
            spec, device, flashinfer
        )
        is_fp8 = spec.kv_cache_dtype == FP8_KV_DTYPE
        self._scales: dict[str, Any] = (
            dict(k_scale=KV_FP8_SCALE, v_scale=KV_FP8_SCALE) if is_fp8 else {}
        )

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: FlashInferMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        m = metadata
        bs = m.block_size
        # Slot -> row of the [blocks * 2 * bs, Hkv, D] view (K rows; V rows are bs further).
        k_rows = (m.slot_mapping // bs) * (2 * bs) + m.slot_mapping % bs
        rows = kv_cache.view(-1, kv_cache.shape[-2], kv_cache.shape[-1])
        write_kv(rows, k_rows, k)
        write_kv(rows, k_rows + bs, v)
        params = LayerParams(scale, sliding_window, softcap)
        out = torch.empty_like(q)
        d = m.num_decode_tokens
        if d:
            m.decode[params].run(q[:d], kv_cache, out=out[:d], **self._scales)
        if params in m.prefill:
            m.prefill[params].run(q[d:], kv_cache, out=out[d:], **self._scales)
        return out
