"""RMSNorm computed in float32 as HF does, cast back before the weight multiply.

bfloat16 on an AVX-512 CPU runs the same arithmetic as one native call (kernels/rms_norm.c):
at batch 1 the eight small ops cost more in dispatch than in arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from pinnace.runtime.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.native = rms_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.native is not None
            and x.dtype == torch.bfloat16
            and self.weight.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.is_contiguous()
        ):
            return self.native(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and multiplied in float32
    before the cast back (Llama casts first)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)
