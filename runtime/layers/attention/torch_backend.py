"""Portable attention backend on plain torch ops (CPU and CUDA).

The cache tensor of each layer's K (and V) is laid out in head-major blocks, so that one
gather yields every request's context already in the [B, Hkv, L, D] shape attention
wants (no transposing copy):

    cache rows      [num_blocks * Hkv, bs * D]   row (block * Hkv + h) = head h of a block
    write           token at slot (block, off) -> row (block * Hkv + h), offset off
    gather          idx[b, h, n] = block_tables[b, n] * Hkv + h -> [B, Hkv, n_blk * bs, D]
    mask            [B, 1, max_q, L]  causal (query position = computed + j), within
                                      seq_len, and within the sliding window if any

Per layer the step's K/V are written first, then read (AttentionBackend's invariant).
Decode-only steps (every query length 1) use a matmul path with grouped heads (the CPU
backend in cpu_backend.py reads the blocks in place with a native kernel instead). Steps
with prefill chunks use scaled_dot_product_attention on padded queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pinnace.runtime.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    BatchLayout,
)
from pinnace.runtime.layers.attention.fp8_kv import read_kv, write_kv


@dataclass
class TorchAttentionMetadata:
    write_rows: torch.Tensor  # [T * Hkv] row of the [num_slots * Hkv, D] view per new k/v
    gather_rows: torch.Tensor  # [B, Hkv, n_blk] row of the [num_blocks * Hkv, bs * D] view
    q_pos: torch.Tensor  # [B, max_q] absolute position of each padded query
    kv_pos: torch.Tensor  # [L] with L = n_blk * bs
    q_gather: torch.Tensor | None  # [B * max_q] flat row per padded query; None if decode
    q_scatter: torch.Tensor | None  # [T] padded row per flat token
    max_q: int
    block_size: int
    causal_mask: torch.Tensor  # [B, 1, max_q, L] without sliding window
    block_tables: torch.Tensor  # [B, n_blk] int64, for the native decode kernel
    seq_lens: torch.Tensor  # [B] int64
    # No request has KV before this step: its padded queries j see keys 0..j of its own
    # gathered context, which is SDPA's is_causal (top-left aligned), no mask needed.
    from_scratch: bool = False
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _hidden: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _kv_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.q_gather is None

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window is None:
            return self.causal_mask
        if sliding_window not in self._window_masks:
            # Keys within the last `sliding_window` positions, the query itself included.
            near = self.kv_pos[None, None, :] > self.q_pos[:, :, None] - sliding_window
            self._window_masks[sliding_window] = self.causal_mask & near[:, None]
        return self._window_masks[sliding_window]

    def hidden(self, sliding_window: int | None) -> torch.Tensor:
        """~mask, computed once per step rather than in every layer."""
        if sliding_window not in self._hidden:
            self._hidden[sliding_window] = ~self.mask(sliding_window)
        return self._hidden[sliding_window]

    def kv_rows(self, rows_per_cache: int) -> torch.Tensor:
        """gather_rows of K then of V in a layer's [2 * rows_per_cache, bs * D] view, flat.

        One index_select over flat rows is about 4x faster than advanced indexing on CPU;
        the index is built once per step (every layer's cache has the same shape)."""
        if rows_per_cache not in self._kv_rows:
            flat = self.gather_rows.reshape(-1)
            self._kv_rows[rows_per_cache] = torch.cat((flat, flat + rows_per_cache))
        return self._kv_rows[rows_per_cache]


class TorchMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads

    def build(self, layout: BatchLayout, graph_bucket: int | None = None) -> TorchAttentionMetadata:
        if graph_bucket is not None:
            raise NotImplementedError("the torch backend's metadata is rebuilt every step")
        dev, bs, kv_heads = layout.device, layout.block_size, self.num_kv_heads
        seq_lens = layout.seq_lens
        max_q = max(layout.query_lens)
        num_blk = -(-max(seq_lens) // bs)
        tables = _block_tables(layout, num_blk)
        heads = torch.arange(kv_heads)
        gather_rows = tables[:, None, :] * kv_heads + heads[None, :, None]
        slots = layout.slot_mapping.cpu()
        # (block * Hkv + h) * bs + off, with block = slot // bs and off = slot % bs
        write_rows = ((slots // bs)[:, None] * kv_heads + heads[None, :]) * bs + (slots % bs)[
            :, None
        ]
        kv_pos = torch.arange(num_blk * bs)
        computed = torch.tensor(layout.num_computed_tokens, dtype=torch.long)
        seq_t = torch.tensor(seq_lens, dtype=torch.long)
        q_pos = computed[:, None] + torch.arange(max_q)[None, :]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (
            kv_pos[None, None, :] < seq_t[:, None, None]
        )
        q_gather = q_scatter = None
        if max_q > 1:
            q_gather, q_scatter = _padding_indices(layout.query_lens, max_q)
            q_gather, q_scatter = q_gather.to(dev), q_scatter.to(dev)
        return TorchAttentionMetadata(
            write_rows=write_rows.reshape(-1).to(dev),
            gather_rows=gather_rows.to(dev),
            q_pos=q_pos.to(dev),
            kv_pos=kv_pos.to(dev),
            q_gather=q_gather,
            q_scatter=q_scatter,
            max_q=max_q,
            block_size=bs,
            causal_mask=mask[:, None].to(dev),
            block_tables=tables.to(dev),
            seq_lens=seq_t.to(dev),
            from_scratch=not any(layout.num_computed_tokens),
        )


def _block_tables(layout: BatchLayout, num_blk: int) -> torch.Tensor:
    """[B, num_blk] int64 on the host: the persistent batch's table when given, else built
    from the lists (entries past a request's own blocks are 0, masked by seq_len)."""
    if layout.block_table_cpu is not None:
        return layout.block_table_cpu[:, :num_blk].to(torch.long)
    tables = torch.zeros(len(layout.block_tables), num_blk, dtype=torch.long)
    for b, table in enumerate(layout.block_tables):
        n = min(len(table), num_blk)
        tables[b, :n] = torch.tensor(table[:n], dtype=torch.long)
    return tables


class TorchAttentionBackend(AttentionBackend):
    """SDPA / matmul attention over gathered head-major blocks; any device, any dtype."""

    name = "torch"

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.builder = TorchMetadataBuilder(num_kv_heads)

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        # [K|V, block, head, offset, D]: row (block * Hkv + h) of the [rows, bs * D] view
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        m = metadata
        head_dim = k.shape[-1]
        write_kv(kv_cache[0].view(-1, head_dim), m.write_rows, k.reshape(-1, head_dim))
        write_kv(kv_cache[1].view(-1, head_dim), m.write_rows, v.reshape(-1, head_dim))
        return self._attend(q, kv_cache, m, scale, sliding_window, softcap)

    def _attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        m: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """The step's queries against the cache (its K/V already written)."""
        head_dim = q.shape[-1]
        if m.is_decode and softcap is None:
            out = self._decode_in_place(q, kv_cache, m, scale, sliding_window)
            if out is not None:
                return out
        k_ctx, v_ctx = read_kv(_gather(kv_cache, m, head_dim), q.dtype).unbind(0)  # [B, Hkv, L, D]
        if m.is_decode:
            return _decode_attention(q, k_ctx, v_ctx, m.hidden(sliding_window), scale, softcap)
        mask = m.mask(sliding_window)
        num_reqs, num_heads = k_ctx.shape[0], q.shape[1]
        q_pad = q[m.q_gather].view(num_reqs, m.max_q, num_heads, head_dim).transpose(1, 2)
        if softcap is not None:
            out = _capped_attention(q_pad, k_ctx, v_ctx, m.hidden(sliding_window), scale, softcap)
        elif m.from_scratch and sliding_window is None:
            # About half the time of the masked call at 2048 tokens (its causal blocks are
            # skipped, no mask converted); padded rows past a request's own keys are dropped.
            out = F.scaled_dot_product_attention(
                q_pad, k_ctx, v_ctx, is_causal=True, scale=scale,
                enable_gqa=num_heads != k_ctx.shape[1],
            )  # fmt: skip
        else:
            out = F.scaled_dot_product_attention(
                q_pad,
                k_ctx,
                v_ctx,
                attn_mask=mask,
                scale=scale,
                enable_gqa=num_heads != k_ctx.shape[1],
            )  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(num_reqs * m.max_q, num_heads, head_dim)
        return out[m.q_scatter]

    def _decode_in_place(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        m: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor | None:
        """A decode step read from the blocks in place, or None to gather (subclasses)."""
        return None


def _gather(kv_cache: torch.Tensor, m: TorchAttentionMetadata, head_dim: int) -> torch.Tensor:
    """A layer's K and V -> [2, B, Hkv, L, D], (block, head) rows of bs * D values."""
    block_rows = kv_cache.view(-1, m.block_size * head_dim)  # K's rows, then V's
    out = block_rows.index_select(0, m.kv_rows(block_rows.shape[0] // 2))
    batch, kv_heads, _ = m.gather_rows.shape
    return out.view(2, batch, kv_heads, -1, head_dim)


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query per request. q: [B, H, D]; k/v: [B, Hkv, L, D]; hidden: [B, 1, 1, L], the
    keys a query must not see."""
    num_reqs, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    qg = q.view(num_reqs, kv_heads, group, head_dim)  # heads h = kv_head * group + g
    scores = _capped(torch.matmul(qg, k.transpose(-1, -2)) * scale, softcap)  # [B, Hkv, G, L]
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, Hkv, G, D]
    return out.reshape(num_reqs, num_heads, head_dim)


def _capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Eager attention with soft-capped scores (Gemma 2), in HF's order of operations.
    q: [B, H, Q, D]; k/v: [B, Hkv, L, D]; hidden: [B, 1, Q, L] -> [B, H, Q, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = _capped(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)  # [B, H, Q, L]
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(scores / cap): scores bounded to (-cap, cap), near-identity when small."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _padding_indices(query_lens: list[int], max_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map flat rows <-> padded rows. Padded slots gather row 0 (their output is dropped)."""
    gather = torch.zeros(len(query_lens) * max_q, dtype=torch.long)
    scatter = torch.empty(sum(query_lens), dtype=torch.long)
    start = 0
    for b, n in enumerate(query_lens):
        gather[b * max_q : b * max_q + n] = torch.arange(start, start + n)
        scatter[start : start + n] = torch.arange(b * max_q, b * max_q + n)
        start += n
    return gather, scatter
