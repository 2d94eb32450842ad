"""Python side of bf16_gemv.c: y = bf16(x @ w^T + bias) for decode's bfloat16 rows.

    gemv = bf16_gemv()             # None when the kernel is unavailable here
    y = gemv(x, weight, bias)      # x [M, K], weight [N, K] as nn.Linear stores it

Where the CPU has AMX (and Linux grants the tile state), 2-64 rows use its tiles; `use_amx`
turns that off and on (tests, benchmarks); `max_rows()`: the most rows it beats oneDNN at.
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
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")
# The kernel takes any number of rows. With AVX-512 alone every activation row adds a
# VDPBF16PS per 64 weight bytes, which shows from 2 rows; with AMX the cost per weight byte
# is the same for 2-16 rows. SmolLM2-135M's 120 layer matmuls, 1 thread, contended (load
# 3.4), GB/s of weights, median of 7 rounds (hack/bench/linear_kernels.py):
#   rows                     1      2      4      5      8
#   AVX-512 only (before)  12.5   11.0   10.2    9.2    7.4
#   AMX from 2 rows        12.4   12.3   12.1   11.8   11.5
#   oneDNN packed (AMX)    11.2   11.3   11.2   11.1   11.1
# so decode steps of up to 8 rows (a speculative verification of 7 proposals) take it.
MAX_ROWS = 8
# With AMX, 17-32 rows take two B and two C tiles per weight tile (each weight tile read
# once), and 9-32 rows beat oneDNN's packed GEMM (as PackedLinear packs it, no batch hint).
# Same bench, --compare-avx512, 1 thread, 9 rounds, contended (load 5.9-6.4), GB/s:
#   rows                     9     12     16     17     20     24     32
#   AMX GEMV               11.2   11.0   10.3   10.3    9.8    9.4    9.0
#   oneDNN packed           9.6    9.5    9.3    7.9    7.8    8.0    8.0
#   AVX-512 GEMV            6.3    5.2    4.2    4.0    3.4    3.1    2.4
# packed / AMX time per round: >= 1.09 at every row count (median 1.16-1.30). 2 threads,
# 15 rounds, a quieter spell (load 3.9-4.1): rows 16/17/24/32 AMX 19.2/19.3/18.4/16.5,
# packed 17.5/15.3/15.1/14.9 GB/s (median ratio 1.10/1.26/1.23/1.11; 17-32: >= 1.09 every
# round). The 49152 x 576 LM head (--lm-head), 16-32 rows: median ratio 1.04-1.17 on 1
# thread, 1.00-1.10 on 2 (both near the ~7 GB/s it gets from memory there). Decode steps
# (hack/bench/step_profile.py --compare-onednn, random SmolLM2 shape, 3 rounds, median ms,
# oneDNN -> GEMV): 2 threads (load 2.8-4.4) batch 20 28.6 -> 23.6 (matmul 14.4 -> 10.8, LM
# head 3.1 -> 2.7), batch 32 31.3 -> 27.7; 1 thread (load 3.0) 45.3 -> 37.6, 50.4 -> 43.3.
# 33-64 rows take two passes of the 17-32 arrangement over each block of 2 weight tiles
# (bf16_gemv.c). Alone, the kernels tie (below); in the engine the GEMV wins: the serving
# benchmark at saturation (48 running requests: every decode step 48 rows), quiet machine,
# `hack/bench/serving.py --compare --rates inf --rounds 5 --offline`, 33-64 rows routed
# here vs to oneDNN as two servers of one run: online 1431 (1348-1448) vs 1276 (1251-1295)
# output tok/s, time per output token p50 31.9 vs 36.0 ms; offline LLM.generate of the
# same requests 1513-1559 tok/s vs 1322-1368 in the run before. hack/bench/
# gemv_rows.py (SmolLM2 shapes, the kernels alternating; "step": a decode step's qkv, o,
# gate_up, down x 30 and LM head), packed / GEMV time per round, median (min-max), rows
# 33/40/48/56/64: 2 threads, 11 rounds (load 2.3): 1.00 (0.99-4.8) / 1.06 (0.99-1.20) /
# 1.01 (0.47-1.19) / 0.98 (0.83-1.19) / 0.99 (0.98-1.16), best round 19.2/19.0/18.6/16.9/
# 16.4 GB/s vs packed 19.3/18.0/18.2/17.2/16.8 (both at the memory's pace); 1 thread, 9
# rounds (load 4.2-4.5): 1.03/1.09/1.04/1.05/1.03, the LM head alone 0.93-0.99.
AMX_MAX_ROWS = 64
_amx_on = False

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
    lib.pinnace_bf16_gemv_use_amx.argtypes = [ctypes.c_int]
    lib.pinnace_bf16_gemv_use_amx.restype = ctypes.c_int
    global _amx_on
    _amx_on = bool(lib.pinnace_bf16_gemv_use_amx(int(_amx_cpu())))
    return lib


def _amx_cpu() -> bool:
    return all(flag in build.cpu_flags() for flag in AMX_CPU_FLAGS)


def use_amx(on: bool) -> bool:
    """Lets the kernel use AMX tiles (where the CPU has them and Linux grants their state)
    or not; returns whether it now does. The default: where available."""
    global _amx_on
    lib = _lib()
    if lib is None:
        return False
    _amx_on = bool(lib.pinnace_bf16_gemv_use_amx(int(on and _amx_cpu())))
    return _amx_on


def max_rows() -> int:
    """The most activation rows a call should give the GEMV rather than oneDNN's packed
    GEMM: AMX_MAX_ROWS with AMX tiles, MAX_ROWS on AVX-512 alone."""
    return AMX_MAX_ROWS if _amx_on else MAX_ROWS


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
