"""AWQ checkpoints (AutoAWQ GEMM packing) -> Int4Weight.

On-disk tensors of one linear layer with K inputs, N outputs, G = K / group_size groups:

    qweight  int32 [K, N / 8]   packed along N, interleaved (below)
    qzeros   int32 [G, N / 8]   same packing
    scales   fp16  [G, N]

    W^T[k, n] = scales[g, n] * (q[k, n] - zero[g, n]),   g = k // group_size

The GEMM kernels want output columns interleaved inside each int32: nibble i (bits
4i..4i+3) of packed column c holds output column 8c + AWQ_PACK_ORDER[i]:

    nibble   0  1  2  3  4  5  6  7
    column   0  2  4  6  1  3  5  7   (+ 8c)
"""

from __future__ import annotations

import torch

from pinnace.runtime.layers.quantization.config import AWQConfig
from pinnace.runtime.layers.quantization.gptq import (
    check_int32,
    checked_group_size,
    unpack_int32_cols,
)
from pinnace.runtime.layers.quantization.int4 import Int4Weight

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_TENSORS = ("qweight", "qzeros", "scales")

# Column j of a group of 8 sits in nibble _NIBBLE_OF_COLUMN[j].
_NIBBLE_OF_COLUMN = torch.tensor([AWQ_PACK_ORDER.index(j) for j in range(8)])


def unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8C] in plain column order."""
    nibbles = unpack_int32_cols(packed).view(packed.shape[0], -1, 8)  # [R, C, nibble]
    return nibbles[:, :, _NIBBLE_OF_COLUMN].reshape(packed.shape[0], -1)


def awq_to_int4(tensors: dict[str, torch.Tensor], config: AWQConfig, name: str) -> Int4Weight:
    """One layer's AWQ tensors -> Int4Weight; ValueError naming `name` when inconsistent."""
    qweight, qzeros, scales = (tensors[k] for k in AWQ_TENSORS)
    check_int32(name, qweight=qweight, qzeros=qzeros)
    q = unpack_awq_cols(qweight)  # [K, N]
    zeros = unpack_awq_cols(qzeros).to(torch.float32)
    group_size = checked_group_size(name, config.group_size, q, zeros, scales, qweight, qzeros)
    scale = scales.to(torch.float32)
    return Int4Weight(
        codes=q.T.contiguous(),
        scales=scale,
        zeros=scale * (8 - zeros),
        group_size=group_size,
    )
