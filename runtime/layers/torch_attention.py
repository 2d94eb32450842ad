"""Portable attention backend on torch's scaled_dot_product_attention (CPU and CUDA).

The step's ragged requests are padded into one batch so each layer makes one SDPA call:

    q_pad   [B, H, max_q, D]     gathered from the flat [T, H, D] queries
    k_pad   [B, Hkv, max_kv, D]  gathered from cache slots via the block tables
    mask    [B, 1, max_q, max_kv] causal (query position = computed + j), within seq_len,
                                  and within the sliding window when there is one
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pinnace.runtime.layers.attention_backend import AttentionBackend, BatchLayout


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    kv_slots: torch.Tensor  # [B, max_kv] cache slot per key position (0 where padded)
    q_pos: torch.Tensor  # [B, max_q] absolute position of each padded query
    kv_pos: torch.Tensor  # [max_kv]
    seq_lens: torch.Tensor  # [B]
    q_gather: torch.Tensor | None  # [B * max_q] flat row per padded query; None if all max_q=1
    q_scatter: torch.Tensor | None  # [T] padded row per flat token
    max_q: int
    causal_mask: torch.Tensor  # [B, 1, max_q, max_kv] without sliding window
    _window_masks: dict[int, torch.Tensor]

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
        num_reqs = len(seq_lens)
        max_q, max_kv = max(layout.query_lens), max(seq_lens)
        bs = layout.block_size
        max_blocks = -(-max_kv // bs)
        tables = torch.zeros(num_reqs, max_blocks, dtype=torch.long)
        for b, table in enumerate(layout.block_tables):
            n = min(len(table), max_blocks)
            tables[b, :n] = torch.tensor(table[:n], dtype=torch.long)
        kv_pos = torch.arange(max_kv)
        # slot = block_ids[pos // bs] * bs + pos % bs
        kv_slots = tables[:, kv_pos // bs] * bs + kv_pos % bs
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
            kv_slots=kv_slots.to(dev),
            q_pos=q_pos.to(dev),
            kv_pos=kv_pos.to(dev),
            seq_lens=seq_t.to(dev),
            q_gather=q_gather,
            q_scatter=q_scatter,
            max_q=max_q,
            causal_mask=mask[:, None].to(dev),
            _window_masks={},
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
        kv_cache[0].index_copy_(0, m.slot_mapping, k.to(kv_cache.dtype))
        kv_cache[1].index_copy_(0, m.slot_mapping, v.to(kv_cache.dtype))
        num_reqs, num_heads, head_dim = m.kv_slots.shape[0], q.shape[1], q.shape[2]
        if m.q_gather is None:
            q_pad = q.view(num_reqs, 1, num_heads, head_dim)
        else:
            q_pad = q[m.q_gather].view(num_reqs, m.max_q, num_heads, head_dim)
        k_pad = kv_cache[0][m.kv_slots].to(q.dtype)  # [B, max_kv, Hkv, D]
        v_pad = kv_cache[1][m.kv_slots].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            k_pad.transpose(1, 2),
            v_pad.transpose(1, 2),
            attn_mask=m.mask(sliding_window),
            scale=scale,
            enable_gqa=num_heads != k_pad.shape[2],
        )  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(num_reqs * m.max_q, num_heads, head_dim)
        if m.q_scatter is None:
            return out
        return out[m.q_scatter]


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
