"""KV cache tensors and the block count a memory budget allows.

The layout of each layer's tensor is the attention backend's (`kv_cache_shape`); this module
only sizes and allocates what the backend asks for.
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from pinnace.runtime.layers.attention.backend import AttentionBackend


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def block_bytes(
    config: PretrainedConfig,
    block_size: int,
    dtype: torch.dtype,
    backend: AttentionBackend,
    layers: range | None = None,
) -> int:
    """Bytes of K and V for one block of every layer at cache dtype `dtype` (FP8: 1 B/value);
    `layers`: a pipeline stage's layers only (None: all)."""
    num_layers, kv_heads, head_dim = kv_geometry(config)
    per_layer = math.prod(backend.kv_cache_shape(1, block_size, kv_heads, head_dim))
    return len(layers or range(num_layers)) * per_layer * dtype.itemsize


def allocate_kv_caches(
    config: PretrainedConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    layers: range | None = None,
) -> list[torch.Tensor]:
    """Per layer one tensor of backend.kv_cache_shape(num_blocks, block_size, Hkv, D).

    `dtype` is the cache dtype: the model's, or float8_e4m3fn for an FP8 cache (written and
    read through layers/attention/fp8_kv.py, which applies its scale). With `layers` (a
    pipeline stage's), the other layers' entries are empty: the list stays indexed by the
    global layer index.
    """
    num_layers, kv_heads, head_dim = kv_geometry(config)
    shape = backend.kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)
    owned = layers or range(num_layers)
    # zeros, not empty: padded key positions are masked, but 0 * NaN garbage would still
    # poison the attention output.
    return [
        torch.zeros(shape if i in owned else (0,), dtype=dtype, device=device)
        for i in range(num_layers)
    ]
