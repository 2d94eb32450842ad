"""INT8 weights on CUDA: W8A8 through `torch._int_mm` for prefill-sized steps.

    out = (q_x @ q_w^T) * s_x[m] * s_w[n]     q_x = round(x / s_x), s_x[m] = max_k |x[m, k]| / 127

Activations are quantized per token on the fly and the int8 x int8 product accumulates
in int32 on the tensor cores. `_int_mm` needs more than 16 rows and both matrix dimensions
in multiples of 8; decode steps (few rows) read the int8 weights through the dequantize
path instead, which is bandwidth-bound either way.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MIN_ROWS = 17  # _int_mm's lower bound on M


def int_mm_eligible(rows: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether a [rows, in] x [in, out] int8 product can go through torch._int_mm."""
    return (
        device.type == "cuda"
        and rows >= MIN_ROWS
        and in_features % 8 == 0
        and out_features % 8 == 0
    )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], float32 scales [M, 1]), symmetric per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / 127
    codes = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float) times int8 codes [N, K] with per-channel w_scale [N] -> [M, N] in
    x's dtype."""
    xq, x_scale = quantize_rows(x)
    acc = torch._int_mm(xq, codes.t())  # [M, N] int32
    return (acc.float() * x_scale * w_scale.float()[None, :]).to(x.dtype)
