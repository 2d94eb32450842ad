"""FP8 KV cache: K and V stored as scaled e4m3 (one byte per value), attention in the model dtype.

    stored = clamp(x / KV_FP8_SCALE, ±448) as e4m3      read = stored * KV_FP8_SCALE

One static per-tensor scale (vLLM's approach when a checkpoint ships no calibrated k/v
scales). e4m3 keeps 3 mantissa bits over 2^-6..448, so the scale only chooses the window:
1/4 maps it onto |k|, |v| in 0.004..112 — keys and values of the models we run stay within
a few tens (SmolLM2-135M: |k| <= 19, |v| <= 10) — and larger values saturate instead of
becoming NaN. A power of two, so scaling itself is exact.
"""

from __future__ import annotations

import torch

from pinnace.runtime.layers.quantization.config import KV_CACHE_DTYPES

FP8_KV_DTYPE = torch.float8_e4m3fn
KV_FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)
KV_FP8_SCALE = 0.25


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """'auto' -> the model dtype; 'fp8' / 'fp8_e4m3' -> float8_e4m3fn."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}.")


def write_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values. cache: [num_slots, Hkv, D]; values: [T, Hkv, D]."""
    if cache.dtype != FP8_KV_DTYPE:
        cache.index_copy_(0, slots, values.to(cache.dtype))
        return
    scaled = (values.float() / KV_FP8_SCALE).clamp_(-KV_FP8_MAX, KV_FP8_MAX).to(FP8_KV_DTYPE)
    # index_copy_ has no float8 kernel on CPU; the bytes are the same as uint8.
    cache.view(torch.uint8).index_copy_(0, slots, scaled.view(torch.uint8))


def read_kv(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache values (any shape) -> `dtype`, undoing the FP8 scale."""
    if stored.dtype != FP8_KV_DTYPE:
        return stored.to(dtype)
    # A 256-entry table (every e4m3 byte, already times the scale) instead of a cast: the
    # CPU cast from float8 is scalar code, several times slower than this gather.
    table = _decode_table(dtype, stored.device)
    codes = stored.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return table.index_select(0, codes).view(stored.shape)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _decode_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _TABLES:
        every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_KV_DTYPE)
        _TABLES[key] = (every_byte.to(torch.float32) * KV_FP8_SCALE).to(dtype).to(device)
    return _TABLES[key]
