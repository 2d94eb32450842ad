"""Python side of rms_norm.c: HF's RMSNorm on contiguous bfloat16 rows in one call.

`rms_norm()` is None when the kernel is unavailable here; otherwise `norm(x, weight, eps)`
takes x bf16 [..., H] (contiguous) and weight bf16 [H].
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from pinnace.runtime.kernels import build

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")

Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@functools.cache
def rms_norm() -> Norm | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = build.native_function(
        "rms_norm", REQUIRED_CPU_FLAGS, "pinnace_rms_norm_bf16",
        [ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int], None,
    )  # fmt: skip
    if fn is None:
        return None

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        cols = x.shape[-1]
        out = torch.empty_like(x)
        fn(
            x.data_ptr(),
            weight.data_ptr(),
            x.numel() // cols,
            cols,
            eps,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out

    return norm
