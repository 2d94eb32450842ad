"""FP8 (e4m3) weights: quantized at load per output channel, or read from FP8 checkpoints.

    W[n, k] ≈ scale[n] * q[n, k]                      per channel (scale = max |W[n]| / 448)
    W[n, k] ≈ scale[n // bn, k // bk] * q[n, k]       block-wise checkpoints ([bn, bk] blocks)

On CUDA GPUs with FP8 tensor cores (compute capability 8.9+) a per-channel layer runs
`torch._scaled_mm` with the activations quantized per token on the fly; everywhere else
the e4m3 codes are cast to the activation dtype and the scale is applied around a plain
matmul (dequantize on the fly: weights stay one byte each in memory).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pinnace.runtime.layers.quantization.int8 import frozen

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (e4m3 codes [N, K], float32 scales [N]), per output channel."""
    # `amax` [N]: each row's max |w| when the rows are longer than `weight` (a tensor-
    # parallel shard of the input dimension): the scales of the whole rows.
    w = weight.float()
    scale = (w.abs().amax(dim=1) if amax is None else amax.float()) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def expand_block_scales(
    scale: torch.Tensor, block: tuple[int, int], shape: torch.Size
) -> torch.Tensor:
    """[ceil(N/bn), ceil(K/bk)] block scales -> [N, K], one per weight."""
    rows, cols = shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:rows, :cols]


def scaled_mm_supported(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


class Fp8Linear(nn.Module):
    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: nn.Parameter | None,
        block_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if codes.dtype != FP8_DTYPE:
            raise ValueError(f"FP8 weights must be {FP8_DTYPE}, got {codes.dtype}.")
        self.out_features, self.in_features = codes.shape
        self.block_size = block_size
        self.weight = frozen(codes)
        self.weight_scale = frozen(scale if scale.dtype == torch.float32 else scale.float())
        self.bias = bias
        # _scaled_mm wants both matmul dimensions in multiples of 16.
        self.use_scaled_mm = (
            block_size is None
            and scaled_mm_supported(codes.device)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = self._scaled_mm(x2) if self.use_scaled_mm else None
        if out is None:
            if self.block_size is not None:
                out = F.linear(x2, self.dequantized_weight().to(x2.dtype))
            else:
                out = F.linear(x2, self.weight.to(x2.dtype)) * self.weight_scale.to(x2.dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*lead, self.out_features)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor | None:
        """FP8 x FP8 on tensor cores, activations scaled per token; None if unsupported."""
        x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
        xq = (x / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        try:
            return torch._scaled_mm(
                xq,
                self.weight.t(),  # column-major [K, N], as _scaled_mm wants its second operand
                scale_a=x_scale,  # [M, 1]
                scale_b=self.weight_scale.view(1, -1),  # [1, N]
                bias=self.bias,
                out_dtype=x.dtype,
            )
        except RuntimeError as error:  # e.g. row-wise scaling unsupported by this GPU/build
            logger.warning("torch._scaled_mm unavailable (%s); dequantizing FP8 instead", error)
            self.use_scaled_mm = False
            return None

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, K]."""
        weight = self.weight.float()
        if self.block_size is None:
            return weight * self.weight_scale[:, None]
        return weight * expand_block_scales(self.weight_scale, self.block_size, weight.shape)

    def extra_repr(self) -> str:
        kernel = "scaled_mm" if self.use_scaled_mm else "dequantize"
        scales = f"blocks {self.block_size}" if self.block_size else "per channel"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scales={scales}, kernel={kernel}"
        )
