"""Rotary position embedding with HF's own frequency initialisers (default, llama3, ...)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pinnace.runtime.layers.forward_context import current_rope_offsets, current_step_cache


def _rope_parameters(config: PretrainedConfig, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if layer_type is not None:  # Gemma 3: one set per kind of layer
        params = (params or {})[layer_type]
    params = dict(params or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; applied in the "rotate half" layout.

    `layer_type` picks one of per-layer-kind parameter sets (Gemma 3's local and global
    layers rotate with different bases).

    LongRoPE (Phi-3): transformers picks the short or long factors per forward, long once
    max(position) + 1 > original_max_position_embeddings (`orig`), and never re-rotates
    the cache. In its generate, so, a token's rotation depends on its request:

        prompt <= orig:  prompt short; each decoded token long iff its position >= orig
        prompt >  orig:  every token long (the prefill forward already reaches past orig)

    Both are tables here, rows [0, max_positions) per position (short below orig, long
    from it) and rows [max_positions, 2 * max_positions) long throughout; a request's
    tokens index the second with `table_offset(num_prompt_tokens)` added (through the
    forward context), so chunked prefill and recomputation after preemption rotate
    exactly as that one prefill forward did.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        head_dim: int,
        max_positions: int,
        layer_type: str | None = None,
    ) -> None:
        super().__init__()
        self.config, self.head_dim, self.max_positions = config, head_dim, max_positions
        self.layer_type = layer_type
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.long_rope_from: int | None = None  # LongRoPE's orig; None: one table
        self.build_tables()

    def build_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute cos/sin in float32, e.g. after the model was built on the meta device."""
        config, head_dim, layer_type = self.config, self.head_dim, self.layer_type
        params = _rope_parameters(config, layer_type)
        rope_type = params["rope_type"]
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "partial rotary embeddings (partial_rotary_factor < 1) are not supported."
            )
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if rope_type == "default":
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponent), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        else:
            supported = sorted(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic")
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {supported}")
        positions = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = positions[:, None] * inv_freq.to(device=device, dtype=torch.float)[None, :]
        if rope_type == "longrope":
            original = params["original_max_position_embeddings"]
            long_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](
                config, None, seq_len=original + 1, **kwargs
            )
            long = positions[:, None] * long_freq.to(device=device, dtype=torch.float)
            freqs[original:] = long[original:]
            freqs = torch.cat((freqs, long))  # [2 * max_positions, D/2], see the docstring
            self.long_rope_from = original
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def table_offset(self, num_prompt_tokens: int) -> int:
        """Rows to add to a request's positions: max_positions (the long-throughout
        table) for a LongRoPE request whose prompt is longer than orig, else 0."""
        if self.long_rope_from is not None and num_prompt_tokens > self.long_rope_from:
            return self.max_positions
        return 0

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, H, D], k: [T, Hkv, D]."""
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] -> x rotated by each row's position (any number of heads)."""
        cos, signed_sin = self._tables(positions, x.dtype)
        # HF's x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) written as
        # roll(x) = cat(x2, x1) times the sign folded into sin: negation is exact, so the
        # products and their rounding are HF's, in two fewer ops.
        return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sign-folded sin rows [T, 1, D] for the step's positions.

        Every layer of a forward passes the same positions tensor, so they are gathered
        once per forward, not once per layer, and kept in the forward's own scope (the
        kept reference makes the identity check safe: the tensor cannot be freed and its
        id reused). Never across forwards: a CUDA graph replays one positions buffer whose
        contents change, and its capture must record the gather.
        """
        cache = current_step_cache()
        key = (id(self), dtype)
        hit = None if cache is None else cache.get(key)
        if hit is not None and hit[0] is positions:
            return hit[1], hit[2]
        offsets = current_rope_offsets()
        rows = positions if offsets is None else positions + offsets
        # Same rounding as HF: tables cast to the activation dtype before the products.
        cos = self.cos[rows].to(dtype)[:, None, :]
        sin = self.sin[rows].to(dtype)[:, None, :]
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if cache is not None:
            cache[key] = (positions, cos, signed_sin)
        return cos, signed_sin
