"""CPU fast path for bfloat16 linear layers: a native GEMV for decode rows, oneDNN above.

torch's plain bf16 `F.linear` re-lays-out the weight on every call; packing it once into
oneDNN's blocked format roughly halves the time of its matmuls. At 1-8 activation rows
(decode; up to 32 with AMX tiles) a layer only streams its weights once, and the native
BF16 GEMV (kernels/bf16_gemv.c) reads them at close to memory bandwidth, faster than oneDNN;
it reads the weight as nn.Linear stores it, so a layer that has the kernel keeps that
copy besides the packed one (twice the linear weights' memory, bf16 on CPU only).

`bf16_linear` is the one dispatch every bf16 CPU linear goes through. oneDNN's result is
bit-identical to `F.linear`; the GEMV's sums differ from it by float32 rounding order
(not by bf16's) before the shared final rounding to bf16.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pinnace.runtime.kernels.bf16_gemv import Gemv, bf16_gemv
from pinnace.runtime.kernels.bf16_gemv import max_rows as gemv_max_rows

logger = logging.getLogger(__name__)


def bf16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    gemv: Gemv | None,
) -> torch.Tensor:
    """x [..., K] @ W^T + bias for a bf16 layer whose weight is `packed` for oneDNN and, when
    the native GEMV is available (`gemv`), also plain [N, K] (`weight`)."""
    if (
        gemv is not None
        and weight is not None
        and x.dim() == 2
        and x.shape[0] <= gemv_max_rows()
        and x.dtype == torch.bfloat16
    ):
        return gemv(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # Packed without a batch-size hint: a layout for batch 1 makes every call above 16
        # rows (an AMX tile's height) slower and none at or below it faster (the GEMV takes
        # the smallest batches anyway). 30 SmolLM2-shape layer sets, weights cold, 2
        # threads, CPU ms, hint 1 -> none: 16 rows 20.8 -> 21.1, 17 rows 26.8 -> 23.8, 32
        # rows 27.4 -> 24.8, 128 rows 42.5 -> 31.3, 512 rows 108.1 -> 82.2.
        self.weight = nn.Parameter(
            torch.ops.mkldnn._reorder_linear_weight(weight, None), requires_grad=False
        )
        self.bias = linear.bias
        self.gemv = bf16_gemv() if weight.is_contiguous() else None
        # The plain weight for the GEMV (not a Parameter: the packed one is the layer's
        # weight for everything that inspects it); shared, not copied, when tied.
        self.plain: torch.Tensor | None = weight if self.gemv is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight, self.bias, self.plain, self.gemv)

    def extra_repr(self) -> str:
        kernel = "onednn_packed"
        if self.gemv is not None:
            kernel = f"native_bf16_gemv (<= {gemv_max_rows()} rows), {kernel}"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear for a PackedLinear in place; returns how many were packed."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold in memory: its parameters (quantized codes and scales
    are frozen parameters too) plus each PackedLinear's plain copy for the GEMV, which is a
    second copy of that layer's weight unless it shares a parameter's storage (a tied
    lm_head shares the embedding's), plus each int8 layer's oneDNN-packed codes (`packed`,
    an opaque copy that is never shared)."""
    total, storages = 0, set()
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if not p.is_mkldnn:  # oneDNN's packed weights are opaque (and never shared)
            storages.add(p.untyped_storage().data_ptr())
    for m in model.modules():
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
        plain = getattr(m, "plain", None)
        if isinstance(m, PackedLinear) and plain is not None:
            ptr = plain.untyped_storage().data_ptr()
            if ptr not in storages:
                storages.add(ptr)
                total += plain.numel() * plain.element_size()
    return total
