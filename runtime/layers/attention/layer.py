"""The attention layer models call: delegates to the step's backend via the forward context."""

from __future__ import annotations

import torch
from torch import nn

from pinnace.runtime.layers.attention.backend import AttentionSpec, LayerParams
from pinnace.runtime.layers.forward_context import current_rope_offsets, get_forward_context


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

    def rope_forward(
        self, positions: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor | None:
        """forward() of q and k rotated by RotaryEmbedding.rotate, from the unrotated qkv
        projection [T, (H + 2 * Hkv) * D], where the step's backend fuses it (None: the
        caller rotates and calls forward). cos / sin: the rotary's float32 tables."""
        if self.softcap is not None or current_rope_offsets() is not None:
            return None
        ctx = get_forward_context()
        out = ctx.backend.rope_decode(
            qkv,
            positions,
            cos,
            sin,
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata,
            self.num_heads,
            self.scale,
            self.sliding_window,
        )
        return None if out is None else out.reshape(qkv.shape[0], self.num_heads * self.head_dim)


def attention_spec(
    model: nn.Module, dtype: torch.dtype, kv_cache_dtype: torch.dtype
) -> AttentionSpec:
    """The geometry and per-layer parameters of `model`'s Attention layers, in layer order."""
    layers = sorted(
        (m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx
    )
    if not layers:
        raise ValueError("the model has no Attention layer to build a KV cache for.")
    first = layers[0]
    return AttentionSpec(
        num_heads=first.num_heads,
        num_kv_heads=first.num_kv_heads,
        head_size=first.head_dim,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        layers=tuple(LayerParams(m.scale, m.sliding_window, m.softcap) for m in layers),
    )
