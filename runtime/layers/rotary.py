"""Rotary position embedding with HF's own frequency initialisers (default, llama3, ...)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; applied in the "rotate half" layout."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.config, self.head_dim, self.max_positions = config, head_dim, max_positions
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.build_tables()

    def build_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute cos/sin in float32, e.g. after the model was built on the meta device."""
        config, head_dim = self.config, self.head_dim
        params = _rope_parameters(config)
        rope_type = params["rope_type"]
        if rope_type == "default":
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponent), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        else:
            supported = sorted(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic")
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {supported}")
        positions = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = positions[:, None] * inv_freq.to(device=device, dtype=torch.float)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, H, D], k: [T, Hkv, D]."""
        # Same rounding as HF: tables cast to the activation dtype before the products.
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
