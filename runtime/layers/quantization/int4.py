"""4-bit grouped weights (GPTQ, AWQ, GGUF Q4_*) and the linear layer that runs them.

Every 4-bit format is converted at load into one representation, the convention of
PyTorch's int4 kernels:

    W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n],   g = k // group_size,  q in 0..15

(GPTQ/AWQ's `s * (q - z)` is scale s, zero s * (8 - z); GGUF's `d * q + m` is scale d,
zero m + 8 d.) Act-order checkpoints assign input columns to groups in a permuted order;
sorting the columns by group makes the groups contiguous, and the layer then gathers the
activations in that order (`x[:, perm]`) instead of the weights.

On CPU the matmul is `aten._weight_int4pack_mm_for_cpu` when the shapes allow it (rows a
multiple of 16, group of 32..256 columns); elsewhere the codes are dequantized per call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

KERNEL_GROUP_SIZES = (256, 128, 64, 32)


@dataclass
class Int4Weight:
    """Codes and per-group parameters of one weight matrix (or a shard of a packed one)."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15, columns in `perm` order
    scales: torch.Tensor  # float32 [K // group_size, N]
    zeros: torch.Tensor  # float32 [K // group_size, N]
    group_size: int
    perm: torch.Tensor | None = None  # long [K]: column j of codes is input column perm[j]

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        groups = cols // self.group_size
        if cols % self.group_size or self.scales.shape != (groups, rows):
            raise ValueError(
                f"4-bit weight of shape {rows}x{cols} with group size {self.group_size} "
                f"needs scales of shape {(groups, rows)}, got {tuple(self.scales.shape)}."
            )

    @staticmethod
    def concat(parts: list[Int4Weight]) -> Int4Weight:
        """Stack shards along the output dimension (q/k/v into qkv)."""
        first = parts[0]
        for part in parts[1:]:
            if part.group_size != first.group_size or not _same_perm(part.perm, first.perm):
                raise ValueError("4-bit shards differ in group size or act-order permutation.")
        return Int4Weight(
            codes=torch.cat([p.codes for p in parts], 0),
            scales=torch.cat([p.scales for p in parts], 1),
            zeros=torch.cat([p.zeros for p in parts], 1),
            group_size=first.group_size,
            perm=first.perm,
        )

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the original input-column order."""
        scales = self.scales.repeat_interleave(self.group_size, 0).T  # [N, K]
        zeros = self.zeros.repeat_interleave(self.group_size, 0).T
        weight = (self.codes.float() - 8) * scales + zeros
        if self.perm is None:
            return weight
        out = torch.empty_like(weight)
        out[:, self.perm] = weight
        return out


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def kernel_group_size(group_size: int, num_cols: int) -> int | None:
    """A group size the CPU kernel accepts that evenly splits `group_size` (None: none)."""
    for size in KERNEL_GROUP_SIZES:
        if size <= group_size and group_size % size == 0 and num_cols % size == 0:
            return size
    return None


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as 4-bit codes (see the module docstring)."""

    def __init__(
        self,
        weight: Int4Weight,
        bias: nn.Parameter | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        group = kernel_group_size(weight.group_size, self.in_features)
        self.use_kernel = (
            device.type == "cpu"
            and dtype in (torch.bfloat16, torch.float32)
            and self.out_features % 16 == 0
            and group is not None
        )
        scales, zeros = weight.scales, weight.zeros
        if self.use_kernel and group is not None and group != weight.group_size:
            # A coarser group (e.g. one per row) is the same parameters repeated.
            repeat = weight.group_size // group
            scales, zeros = scales.repeat_interleave(repeat, 0), zeros.repeat_interleave(repeat, 0)
        self.group_size = group if self.use_kernel and group is not None else weight.group_size
        codes = weight.codes.to(device)
        if self.use_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:
            packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, K/2]: even k low nibble
        self.weight = nn.Parameter(packed, requires_grad=False)
        # [K // group, N, 2]: the kernel's layout; the fallback reads the same tensor.
        both = torch.stack([scales, zeros], -1).to(device=device, dtype=dtype)
        self.scales_and_zeros = nn.Parameter(both.contiguous(), requires_grad=False)
        self.perm: torch.Tensor | None
        self.register_buffer("perm", None if weight.perm is None else weight.perm.to(device))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.use_kernel and x2.dtype == self.scales_and_zeros.dtype:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                aligned(x2), self.weight, self.group_size, self.scales_and_zeros
            )
        else:
            out = F.linear(x2, self._dequantized(x2.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] in the kernel's (permuted) column order, for the non-kernel path."""
        packed = self.weight
        codes = torch.stack([packed & 15, packed >> 4], -1).view(self.out_features, -1)
        sz = self.scales_and_zeros.repeat_interleave(self.group_size, 0)  # [K, N, 2]
        weight = (codes.to(sz.dtype) - 8) * sz[..., 0].T + sz[..., 1].T
        return weight.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, K] in the original column order: what this layer multiplies by."""
        if self.use_kernel:
            # The packed layout is the kernel's own: read it back through the kernel.
            eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
            weight = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.weight, self.group_size, self.scales_and_zeros
            ).T.float()
        else:
            weight = self._dequantized(torch.float32)
        if self.perm is None:
            return weight
        out = torch.empty_like(weight)
        out[:, self.perm] = weight
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, act_order={self.perm is not None}, "
            f"kernel={'cpu_int4pack' if self.use_kernel else 'dequantize'}"
        )


def aligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous x whose data starts on a 64-byte boundary.

    PyTorch's CPU int4/int8 weight-only kernels use aligned vector loads on the activation
    rows; a view that starts mid-allocation (e.g. a narrow() of a bigger batch) would fault.
    """
    if x.is_contiguous() and x.data_ptr() % 64 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)
