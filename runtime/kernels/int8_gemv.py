"""Python side of int8_gemv.c: y = bf16(x @ (scale * codes)^T) for a few bfloat16 rows.

    gemv = int8_gemv()             # None when the kernel is unavailable here
    y = gemv(x, codes, scale, rowsum)

`scale` is float32 [N] and `rowsum` int32 [N] = codes.sum(1) (the kernel's offset
correction); the layer keeps both next to its codes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from pinnace.runtime.kernels import build

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
# Each activation row costs a pass of integer dot products over the weights: measured on
# SmolLM2-135M's layers (1 thread, AVX-512), 1 row is 2.7x faster than the bf16 GEMV and
# 2 rows 1.7x; from about 3 rows a bf16 GEMM wins.
MAX_ROWS = 2

Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def int8_gemv() -> Gemv | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = build.native_function(
        "int8_gemv", REQUIRED_CPU_FLAGS, "pinnace_int8_gemv_bf16",
        [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int], ctypes.c_int,
    )  # fmt: skip
    if fn is None:
        return None

    def gemv(
        x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, rowsum: torch.Tensor
    ) -> torch.Tensor:
        x = x.contiguous()
        rows, cols = x.shape
        n = codes.shape[0]
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        status = fn(
            x.data_ptr(),
            rows,
            cols,
            codes.data_ptr(),
            scale.data_ptr(),
            rowsum.data_ptr(),
            n,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("int8 GEMV kernel could not allocate its scratch buffer")
        return out

    return gemv
