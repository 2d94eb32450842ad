"""The attention layer models call: delegates to the step's backend via the forward context."""

from __future__ import annotations

import torch
from torch import nn

from pinnace.runtime.layers.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        sliding_window: int | None = None,
        scale: float | None = None,  # None: head_dim ** -0.5
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H * D]."""
        ctx = get_forward_context()
        out = ctx.backend.forward(
            q,
            k,
            v,
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata,
            self.scale,
            self.sliding_window,
            self.softcap,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
