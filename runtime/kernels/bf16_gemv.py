"""Python side of bf16_gemv.c: y = bf16(x @ w^T + bias) for 1-8 bfloat16 rows.

    gemv = bf16_gemv()             # None when the kernel is unavailable here
    y = gemv(x, weight, bias)      # x [M, K], weight [N, K] as nn.Linear stores it

`read_bandwidth(nbytes)` times the kernel's load pattern over a buffer (benchmarks).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable

import torch

from pinnace.runtime.kernels import build

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# The kernel takes any number of rows, but every activation row adds a pass of dot products
# over the weights, while oneDNN's packed GEMM (AMX tiles) barely slows from 1 to 12 rows.
# SmolLM2-135M's 120 layer matmuls, median of 7 rounds (hack/bench/linear_kernels.py),
# packed time / GEMV time: quiet, 2 threads: 2 rows 1.11, 4 rows 1.08, 8 rows 0.70;
# contended, 1 thread: 1 row 1.14, 2 rows 1.01, 4 rows 0.89, 8 rows 0.71.
MAX_ROWS = 4

Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = build.load_for_cpu("bf16_gemv", REQUIRED_CPU_FLAGS)
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.pinnace_bf16_gemv.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.pinnace_bf16_gemv.restype = None
    lib.pinnace_read_sum.argtypes = [ptr, i64, ctypes.c_int]
    lib.pinnace_read_sum.restype = ctypes.c_float
    return lib


@functools.cache
def bf16_gemv() -> Gemv | None:
    lib = _lib()
    if lib is None:
        return None
    fn = lib.pinnace_bf16_gemv

    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        rows, cols = x.shape
        n = weight.shape[0]
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        bias_ptr = None if bias is None else bias.data_ptr()
        fn(
            x.data_ptr(),
            rows,
            cols,
            weight.data_ptr(),
            bias_ptr,
            n,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out

    return gemv


def read_bandwidth(nbytes: int, repeats: int = 5) -> float | None:
    """Best read bandwidth (bytes/s) of `repeats` passes over a fresh `nbytes` buffer with
    the kernel's load pattern and torch's thread count; None without the kernel."""
    lib = _lib()
    if lib is None:
        return None
    buf = torch.ones(nbytes // 4 // 64 * 64, dtype=torch.float32)
    assert buf.data_ptr() % 64 == 0, "torch allocates 64-byte aligned"
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        lib.pinnace_read_sum(buf.data_ptr(), buf.numel(), torch.get_num_threads())
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best
