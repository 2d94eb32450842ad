"""KV cache tensors and the block count a memory budget allows."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def block_bytes(config: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block of every layer at cache dtype `dtype` (FP8: 1 B/value)."""
    layers, kv_heads, head_dim = kv_geometry(config)
    return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize


def allocate_kv_caches(
    config: PretrainedConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per layer [2, num_blocks * block_size, Hkv, D]: K and V, addressed by slot.

    `dtype` is the cache dtype: the model's, or float8_e4m3fn for an FP8 cache (written and
    read through layers.quantization.kv_cache, which applies its scale).
    """
    layers, kv_heads, head_dim = kv_geometry(config)
    shape = (2, num_blocks * block_size, kv_heads, head_dim)
    # zeros, not empty: padded key positions are masked, but 0 * NaN garbage would still
    # poison the attention output.
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
