"""GGUF 4-bit blocks (Q4_0, Q4_1, Q4_K) -> Int4Weight with groups of 32, exactly.

ggml stores each row as blocks; within a 32-value group every format is affine in the
4-bit code q:

    Q4_0  18 B / 32 values:  f16 d, 16 B codes          w = d * (q - 8)
    Q4_1  20 B / 32 values:  f16 d, f16 m, 16 B codes   w = d * q + m
    Q4_K 144 B / 256 values: f16 d, f16 dmin, 12 B of 6-bit (sc, mn) for 8 groups,
                             128 B codes                w = d * sc_j * q - dmin * mn_j

so w = a * q + b per group, i.e. Int4Weight scale a and zero b + 8 a. Codes: in Q4_0/Q4_1
byte j holds value j (low nibble) and value j + 16 (high nibble); in Q4_K each 32-byte
chunk holds 64 values the same way (low nibbles first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.quants import Q4_K

from pinnace.runtime.layers.quantization.int4 import Int4Weight

GROUP = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}


@dataclass(frozen=True)
class GGUFBlocks:
    """A matrix still in ggml blocks, as the GGUF loader hands it over to be kept 4-bit."""

    type_name: str  # "Q4_0", "Q4_1" or "Q4_K"
    data: np.ndarray  # uint8 [rows, bytes per row], rows already in HF order
    shape: tuple[int, int]  # (rows, columns) of the matrix the blocks encode


def gguf_blocks_to_int4(type_name: str, blocks: np.ndarray, num_cols: int) -> Int4Weight:
    """Raw rows of ggml blocks, uint8 [N, bytes per row] -> Int4Weight [N, num_cols]."""
    if type_name not in _BLOCK_BYTES:
        raise ValueError(f"GGUF type {type_name} has no exact 4-bit form.")
    rows = blocks.shape[0]
    per_block = 256 if type_name == "Q4_K" else GROUP
    num_blocks = num_cols // per_block
    if num_cols % per_block or blocks.shape[1] != num_blocks * _BLOCK_BYTES[type_name]:
        raise ValueError(
            f"{type_name} rows of {num_cols} values need {num_blocks * _BLOCK_BYTES[type_name]} "
            f"bytes, got {blocks.shape[1]}."
        )
    flat = np.ascontiguousarray(blocks).reshape(rows * num_blocks, _BLOCK_BYTES[type_name])
    if type_name == "Q4_K":
        codes, a, b = _q4_k(flat)
    else:
        codes, a, b = _q4_0_or_1(flat, with_min=type_name == "Q4_1")
    # codes [rows * blocks, values], a/b [rows * blocks, groups per block]
    codes_t = torch.from_numpy(codes.reshape(rows, num_cols))
    scale = torch.from_numpy(a.reshape(rows, -1)).T.contiguous()  # [K / 32, N]
    offset = torch.from_numpy(b.reshape(rows, -1)).T.contiguous()
    return Int4Weight(codes=codes_t, scales=scale, zeros=offset + 8 * scale, group_size=GROUP)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[B, 16 * n] bytes -> [B, 32 * n] codes: each 16-byte run is 16 low then 16 high."""
    runs = packed.reshape(packed.shape[0], -1, 1, 16)
    both = np.concatenate([runs & 0x0F, runs >> 4], axis=2)
    return both.reshape(packed.shape[0], -1)


def _q4_0_or_1(flat: np.ndarray, with_min: bool) -> tuple[np.ndarray, ...]:
    d = flat[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    if with_min:
        m = flat[:, 2:4].copy().view(np.float16).astype(np.float32)
        codes = _nibbles(flat[:, 4:])
    else:
        m = -8 * d
        codes = _nibbles(flat[:, 2:])
    return codes, d, m


def _q4_k(flat: np.ndarray) -> tuple[np.ndarray, ...]:
    d = flat[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = flat[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(flat[:, 4:16].copy())  # [B, 8] each, 6-bit values
    qs = flat[:, 16:].reshape(flat.shape[0], 4, 32)  # 4 chunks of 64 values
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(flat.shape[0], 256)
    return codes, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
