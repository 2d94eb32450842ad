"""Python side of int8_digits.c: an int8 x int8 GEMM (oneDNN, VNNI/AMX) for bf16 activation
rows against int8 weight codes, with each activation carried by two int8 digits.

    matmul = int8_digits_matmul()      # None when the kernel or oneDNN's int8 GEMM is missing
    packed = matmul.pack(codes)        # once per layer: oneDNN's blocked copy of int8 [N, K]
    y = matmul(x, packed, scale)       # x bf16 [M, K], scale float32 [N] -> y bf16 [M, N]

y = bf16(x @ (scale * codes)^T) up to the digits' rounding (|x| error <= max|x| / 64516
per element) and float32 sums; see int8_digits.c for the scheme.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from pinnace.runtime.kernels import build

logger = logging.getLogger(__name__)

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
# Rows per oneDNN call. A prefill chunk in one call writes (and `combine` reads back) a
# float32 [2 x rows, N] product far larger than the caches: SmolLM2's layer set at 2048 rows
# (1 thread) took 43 ms in one call, 21.5 ms in 512-row calls (bf16: 15 ms).
CHUNK_ROWS = 512


@dataclass(frozen=True)
class DigitsMatmul:
    digits: Any  # ctypes functions of int8_digits.c
    combine: Any

    @staticmethod
    def pack(codes: torch.Tensor) -> torch.Tensor:
        """int8 [N, K] -> oneDNN's packed weight (an opaque mkldnn tensor, N * K bytes)."""
        return torch.ops.onednn.qlinear_prepack(codes, None)

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, scale.shape[0], dtype=torch.bfloat16)
        if rows <= CHUNK_ROWS:  # decode steps: no slicing (a few us of 35 per call)
            self._rows(x, packed, scale, out)
            return out
        # Each row's digits, scale and integer sums are its own: chunks change no output.
        for start in range(0, rows, CHUNK_ROWS):
            self._rows(x[start : start + CHUNK_ROWS], packed, scale, out[start:])
        return out

    def _rows(
        self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out[:len(x)] = x @ (scale codes)^T; x and out contiguous row ranges."""
        rows, cols = x.shape
        threads = torch.get_num_threads()
        digits = torch.empty(2 * rows, cols, dtype=torch.int8)
        x_scale = torch.empty(rows, dtype=torch.float32)
        self.digits(x.data_ptr(), rows, cols, digits.data_ptr(), x_scale.data_ptr(), threads)
        zeros = _zero_points(scale.shape[0])
        # acc [2M, N] float32 = digits @ codes^T * scale (the activation scale is 1 here)
        acc = torch.ops.onednn.qlinear_pointwise.default(
            digits, 1.0, 0, packed, scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        self.combine(
            acc.data_ptr(), rows, acc.shape[1], x_scale.data_ptr(), out.data_ptr(), threads
        )


@functools.cache
def _zero_points(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


@functools.cache
def int8_digits_matmul() -> DigitsMatmul | None:
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    digits = build.native_function(
        "int8_digits", REQUIRED_CPU_FLAGS, "pinnace_int8_digits_bf16",
        [ptr, i64, i64, ptr, ptr, c_int], None,
    )  # fmt: skip
    combine = build.native_function(
        "int8_digits", REQUIRED_CPU_FLAGS, "pinnace_int8_digits_combine",
        [ptr, i64, i64, ptr, ptr, c_int], None,
    )  # fmt: skip
    if digits is None or combine is None or not _onednn_int8():
        return None
    return DigitsMatmul(digits, combine)


def _onednn_int8() -> bool:
    """Whether this torch build runs oneDNN's int8 linear (x86 builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.onednn.qlinear_prepack(torch.ones(16, 16, dtype=torch.int8), None)
        out = torch.ops.onednn.qlinear_pointwise.default(
            torch.ones(2, 16, dtype=torch.int8), 1.0, 0, packed, torch.ones(16),
            torch.zeros(16, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
    except (RuntimeError, AttributeError) as error:
        logger.info("oneDNN int8 linear unavailable (%s); int8 keeps its bf16 GEMM", error)
        return False
    return bool((out == 16).all())
