"""INT8 weight-only linear: symmetric per-output-channel codes, float activations.

    W[n, k] ≈ scale[n] * q[n, k],   q in -127..127,  scale[n] = max_k |W[n, k]| / 127

On CPU with bfloat16 activations the matmul depends on the rows (tokens) in the step:
- 1-2 rows (batch-1/2 decode): our AVX-512 VNNI kernel (kernels/int8_gemv.c), which never
  converts the weights and runs at memory bandwidth — where decode gets faster than bf16;
- more rows: an int8 x int8 GEMM through oneDNN (AMX/VNNI) on a packed copy of the codes,
  each activation split into two int8 digits (kernels/int8_digits.c): one digit (plain
  per-token W8A8) costs SmolLM2-135M +3 % perplexity, two keep it at the weight-only level.
  The packed copy doubles the int8 weights' memory, as the bf16 GEMV's plain copy does for
  bf16. Measured on SmolLM2's layers (1 thread, AMX): 1.3x faster than the next option at
  3 rows, 2.5x at 8, and on par with bf16 from 8 rows on while reading half the bytes.
Without that GEMM (no AVX-512 VNNI, no oneDNN int8, PINNACE_NATIVE_KERNELS=0):
- up to KERNEL_MAX_ROWS: `aten._weight_int8pack_mm`, which reads the int8 codes and never
  a dequantized copy but converts each to float, so its time grows with the rows;
- more rows, and float32 and CUDA: cast the codes and run one float GEMM, applying the
  scale to the output: `(x @ q^T) * scale = x @ (scale q)^T`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pinnace.runtime.kernels.int8_digits import int8_digits_matmul
from pinnace.runtime.kernels.int8_gemv import MAX_ROWS as NATIVE_MAX_ROWS
from pinnace.runtime.kernels.int8_gemv import int8_gemv
from pinnace.runtime.layers.quantization.int4 import aligned
from pinnace.runtime.layers.quantization.int8_cuda import MIN_ROWS, int8_matmul, int_mm_eligible

logger = logging.getLogger(__name__)

# _weight_int8pack_mm's time is linear in the rows; measured single-threaded on AVX-512 for
# SmolLM2's layer shapes it loses to cast + GEMM from about 16 rows on.
KERNEL_MAX_ROWS = 16


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A Parameter without gradient (kept as is when it already is one, so it can be shared).

    Quantized codes are Parameters rather than buffers so that summing a model's parameters
    gives its real weight memory, and so that tied layers share them.
    """
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


def quantize_int8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 codes [N, K], float32 scales [N]), round to nearest."""
    # `amax` [N]: each row's max |w| when the rows are longer than `weight` (a tensor-
    # parallel shard of the input dimension): the scales of the whole rows.
    w = weight.float()
    scale = (w.abs().amax(dim=1) if amax is None else amax.float()) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    def __init__(
        self,
        codes: torch.Tensor,  # a Parameter is kept as is (shared with a tied embedding)
        scale: torch.Tensor,
        bias: nn.Parameter | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.weight = frozen(codes)
        self.weight_scale = frozen(scale.to(dtype))
        self.bias = bias
        # The kernel reads 16 values per vector load from 32-byte aligned rows.
        self.use_kernel = (
            codes.device.type == "cpu"
            and dtype == torch.bfloat16
            and self.in_features % 16 == 0
            and codes.data_ptr() % 64 == 0
        )
        self.native = int8_gemv() if self.use_kernel else None
        # Above the native kernel's rows: oneDNN's int8 GEMM on its own packed copy of the codes
        # (not a Parameter: opaque, and the codes stay the layer's weight).
        self.digits = int8_digits_matmul() if self.use_kernel else None
        self.packed = None if self.digits is None else self.digits.pack(self.weight.detach())
        # CUDA: prefill-sized steps through torch._int_mm (int8_cuda.py).
        self.use_int_mm = codes.device.type == "cuda"
        # The native kernel's float32 scales and offset correction (see int8_gemv.c); tiny.
        self.scale_f32: torch.Tensor | None
        self.rowsum: torch.Tensor | None
        self.register_buffer(
            "scale_f32",
            None if self.native is None and self.digits is None else scale.to(dtype).float(),
            False,
        )
        self.register_buffer(
            "rowsum", None if self.native is None else codes.sum(1, dtype=torch.int32), False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        # Rows first: the buffers are nn.Module attribute lookups, ~0.5 us each.
        if (
            rows <= NATIVE_MAX_ROWS
            and self.native is not None
            and self.scale_f32 is not None
            and self.rowsum is not None
            and x2.dtype == torch.bfloat16
        ):
            out = self.native(x2, self.weight, self.scale_f32, self.rowsum)
        elif (
            self.digits is not None
            and self.packed is not None
            and self.scale_f32 is not None
            and x2.dtype == torch.bfloat16
        ):
            out = self.digits(x2, self.packed, self.scale_f32)
        elif self.use_kernel and x2.dtype == torch.bfloat16 and rows < KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(aligned(x2), self.weight, self.weight_scale)
        elif self.use_int_mm and int_mm_eligible(
            rows, self.in_features, self.out_features, x2.device
        ):
            out = self._int_mm(x2)
        else:
            out = F.linear(x2, self.weight.to(x2.dtype)) * self.weight_scale.to(x2.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        """W8A8 on CUDA (int8_cuda.py); falls back to dequantizing, once and for good, where
        this GPU or build has no int8 GEMM."""
        try:
            return int8_matmul(x, self.weight, self.weight_scale)
        except RuntimeError as error:
            logger.warning("torch._int_mm unavailable (%s); dequantizing int8 instead", error)
            self.use_int_mm = False
            return F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]

    def extra_repr(self) -> str:
        kernel = "cpu_int8pack" if self.use_kernel else "dequantize"
        if self.use_int_mm:
            kernel = f"int_mm (>= {MIN_ROWS} rows), dequantize"
        if self.digits is not None:
            kernel = "onednn_int8_digits"
        if self.native is not None:
            kernel = f"native_vnni (<= {NATIVE_MAX_ROWS} rows), {kernel}"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"
