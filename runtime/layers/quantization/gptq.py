"""GPTQ checkpoints (AutoGPTQ / GPTQModel packing) -> Int4Weight.

On-disk tensors of one linear layer with K inputs, N outputs, G groups:

    qweight  int32 [K / 8, N]   packed along K: bits 4i..4i+3 of row r hold input 8r + i
    qzeros   int32 [G, N / 8]   packed along N: bits 4i..4i+3 of column c hold output 8c + i
    scales   fp16  [G, N]
    g_idx    int32 [K]          group of each input column (absent: k // group_size)

    W^T[k, n] = scales[g, n] * (q[k, n] - zero[g, n]),   g = g_idx[k]

GPTQ v1 checkpoints ("checkpoint_format": "gptq", the default) store zero - 1, so the zero
is the stored nibble + 1; gptq_v2 stores the zero itself. With act-order (desc_act) g_idx
is a permutation of k // group_size: each group still has group_size columns, just not
adjacent ones, which Int4Weight.perm handles.
"""

from __future__ import annotations

import torch

from pinnace.runtime.layers.quantization.config import GPTQConfig
from pinnace.runtime.layers.quantization.int4 import Int4Weight

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
GPTQ_REQUIRED = ("qweight", "qzeros", "scales")

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> [8R, C] nibbles, packed along rows (nibble i of row r -> row 8r + i)."""
    nibbles = (packed.to(torch.int32)[:, None, :] >> _SHIFTS[None, :, None]) & 0xF
    return nibbles.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_int32_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> [R, 8C] nibbles, packed along columns (nibble i of col c -> 8c + i)."""
    nibbles = (packed.to(torch.int32)[:, :, None] >> _SHIFTS[None, None, :]) & 0xF
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def gptq_to_int4(tensors: dict[str, torch.Tensor], config: GPTQConfig, name: str) -> Int4Weight:
    """One layer's GPTQ tensors -> Int4Weight; ValueError naming `name` when inconsistent."""
    qweight, qzeros, scales = (tensors[k] for k in GPTQ_REQUIRED)
    check_int32(name, qweight=qweight, qzeros=qzeros)
    q = unpack_int32_rows(qweight)  # [K, N]
    zeros = unpack_int32_cols(qzeros).to(torch.float32) + config.zero_offset  # [G, N]
    group_size = checked_group_size(name, config.group_size, q, zeros, scales, qweight, qzeros)
    g_idx = tensors.get("g_idx")
    perm = _act_order_perm(g_idx, group_size, q.shape[0], name)
    scale = scales.to(torch.float32)
    codes = q if perm is None else q[perm]
    return Int4Weight(
        codes=codes.T.contiguous(),
        scales=scale,
        zeros=scale * (8 - zeros),
        group_size=group_size,
        perm=perm,
    )


def _act_order_perm(
    g_idx: torch.Tensor | None, group_size: int, num_in: int, name: str
) -> torch.Tensor | None:
    """None for the plain k // group_size order, else the column order that sorts groups."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.long)
    plain = torch.arange(num_in) // group_size
    if g_idx.shape != (num_in,):
        raise ValueError(f"{name}: g_idx has shape {tuple(g_idx.shape)}, expected ({num_in},).")
    if torch.equal(g_idx, plain):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], plain):
        raise ValueError(
            f"{name}: g_idx does not put exactly {group_size} columns in each group; "
            "it is not a GPTQ act-order layout."
        )
    return perm


def check_int32(name: str, **tensors: torch.Tensor) -> None:
    for key, tensor in tensors.items():
        if tensor.dtype != torch.int32 or tensor.dim() != 2:
            raise ValueError(
                f"{name}.{key} must be a 2-D int32 tensor, got {tensor.dtype} "
                f"{tuple(tensor.shape)}."
            )


def checked_group_size(
    name: str,
    configured: int,
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
) -> int:
    """config.json's group_size (-1: every input column) once the unpacked codes q [K, N],
    zeros and scales [K / group_size, N] are checked to agree with it (GPTQ and AWQ)."""
    num_in, num_out = q.shape
    group_size = num_in if configured == -1 else configured
    if num_in % group_size:
        raise ValueError(
            f"{name}: {num_in} input columns are not a multiple of group_size {group_size}."
        )
    num_groups = num_in // group_size
    if zeros.shape != (num_groups, num_out) or scales.shape != (num_groups, num_out):
        raise ValueError(
            f"{name}: qweight {tuple(qweight.shape)} means {num_groups} groups of "
            f"{num_out} outputs, but qzeros is {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)}; is group_size {configured} right?"
        )
    return group_size
