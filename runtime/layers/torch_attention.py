"""Portable attention backend on plain torch ops (CPU and CUDA).

Per layer, the step's K/V are first written to their cache slots, then each request's
context is gathered block by block from its block table and padded into one batch:

    kv_cache[i]     [num_blocks * bs, Hkv, D]   viewed as [num_blocks, bs * Hkv * D]
    gather          [B, max_blocks] block ids -> k_pad [B, max_blocks * bs, Hkv, D]
    mask            [B, 1, max_q, max_kv]  causal (query position = computed + j), within
                                           seq_len, and within the sliding window if any

Decode-only steps (every query length 1) take a bmm path with grouped heads; steps with
prefill chunks use scaled_dot_product_attention on padded queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pinnace.runtime.layers.attention_backend import AttentionBackend, BatchLayout
from pinnace.runtime.layers.quantization.kv_cache import read_kv, write_kv


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks] (0 where padded: masked out)
    block_size: int
    max_kv: int
    q_pos: torch.Tensor  # [B, max_q] absolute position of each padded query
    kv_pos: torch.Tensor  # [max_kv]
    q_gather: torch.Tensor | None  # [B * max_q] flat row per padded query; None if decode
    q_scatter: torch.Tensor | None  # [T] padded row per flat token
    max_q: int
    causal_mask: torch.Tensor  # [B, 1, max_q, max_kv] without sliding window
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, layout: BatchLayout) -> TorchAttentionMetadata:
        dev = layout.device
        seq_lens = layout.seq_lens
        max_q, max_kv = max(layout.query_lens), max(seq_lens)
        bs = layout.block_size
        max_blocks = -(-max_kv // bs)
        tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
        for b, table in enumerate(layout.block_tables):
            n = min(len(table), max_blocks)
            tables[b, :n] = torch.tensor(table[:n], dtype=torch.long)
        kv_pos = torch.arange(max_kv)
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
            slot_mapping=layout.slot_mapping,
            block_tables=tables.to(dev),
            block_size=bs,
            max_kv=max_kv,
            q_pos=q_pos.to(dev),
            kv_pos=kv_pos.to(dev),
            q_gather=q_gather,
            q_scatter=q_scatter,
            max_q=max_q,
            causal_mask=mask[:, None].to(dev),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        m = metadata
        write_kv(kv_cache[0], m.slot_mapping, k)  # an FP8 cache stores scaled e4m3
        write_kv(kv_cache[1], m.slot_mapping, v)
        k_pad = read_kv(_gather(kv_cache[0], m), q.dtype)  # [B, max_kv, Hkv, D]
        v_pad = read_kv(_gather(kv_cache[1], m), q.dtype)
        mask = m.mask(sliding_window)
        if m.is_decode:
            return _decode_attention(q, k_pad, v_pad, mask, scale)
        num_reqs, num_heads, head_dim = k_pad.shape[0], q.shape[1], q.shape[2]
        q_pad = q[m.q_gather].view(num_reqs, m.max_q, num_heads, head_dim)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            k_pad.transpose(1, 2),
            v_pad.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != k_pad.shape[2],
        )  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(num_reqs * m.max_q, num_heads, head_dim)
        return out[m.q_scatter]


def _gather(cache: torch.Tensor, m: TorchAttentionMetadata) -> torch.Tensor:
    """[num_slots, Hkv, D] cache -> [B, max_kv, Hkv, D], copying whole blocks at a time."""
    num_slots, kv_heads, head_dim = cache.shape
    blocks = cache.view(num_slots // m.block_size, m.block_size * kv_heads * head_dim)
    out = blocks[m.block_tables]  # [B, max_blocks, bs * Hkv * D]
    return out.view(out.shape[0], -1, kv_heads, head_dim)[:, : m.max_kv]


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per request. q: [B, H, D]; k/v: [B, L, Hkv, D]; mask: [B, 1, 1, L]."""
    num_reqs, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    qg = q.view(num_reqs, kv_heads, group, head_dim)  # heads h = kv_head * group + g
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, Hkv, G, D]
    return out.reshape(num_reqs, num_heads, head_dim)


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
