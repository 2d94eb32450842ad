"""Python side of llama_decode.c: every layer of a Llama stack for decode rows in one call.

Linear layers may be bf16 (the bf16 GEMV) or int8 (the int8 GEMV, where available).

    kernel = llama_decode()    # None where it, the GEMV, the norm or attention is missing
    model = kernel.model(...)  # geometry, rotary tables, the three kernels' entry points
    kernel.run(model, layers, hidden, positions, write_rows, block_tables, seq_lens, scratch)

`Layer` and `Model` mirror the C structs; their pointers must outlive the calls (the
caller keeps the tensors).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pinnace.runtime.kernels import bf16_gemv, build, int8_gemv, paged_attention, rms_norm

REQUIRED_CPU_FLAGS = tuple(
    sorted(
        set(bf16_gemv.REQUIRED_CPU_FLAGS)
        | set(rms_norm.REQUIRED_CPU_FLAGS)
        | set(paged_attention.REQUIRED_CPU_FLAGS)
    )
)
MAX_HEAD_DIM = 256  # the attention kernel's limit (the C side allows up to 512)
# The parts a profiled call times, in the C side's order (enum T_*).
PARTS = ("norm", "matmul", "rope_kv", "attention", "elementwise")

_ptr = ctypes.c_void_p


class Linear(ctypes.Structure):
    """bf16 weight (scale None), or int8 codes with float32 scales and int32 row sums."""

    _fields_ = [("w", _ptr), ("bias", _ptr), ("scale", _ptr), ("rowsum", _ptr)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("in_norm", _ptr), ("post_norm", _ptr), ("qkv", Linear), ("o", Linear),
        ("gate_up", Linear), ("down", Linear), ("k_cache", _ptr), ("v_cache", _ptr),
        ("scale", ctypes.c_float), ("window", ctypes.c_int64),
    ]  # fmt: skip


class Model(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
        ("block_size", ctypes.c_int64), ("eps", ctypes.c_float),
        ("cos", _ptr), ("sin", _ptr), ("gemv", _ptr), ("int8_gemv", _ptr), ("norm", _ptr),
        ("attend", _ptr),
    ]  # fmt: skip


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass
class LlamaDecodeKernel:
    fn: Any  # pinnace_llama_decode_bf16
    scratch_fn: Any  # pinnace_llama_decode_scratch
    entry_points: tuple[int, int | None, int, int]  # bf16 GEMV, int8 GEMV, norm, attend

    def model(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        block_size: int,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Model:
        """cos/sin: float32 [max_positions, head_dim], contiguous (kept alive by the caller)."""
        gemv, int8_gemv, norm, attend = self.entry_points
        return Model(
            hidden, heads, kv_heads, head_dim, intermediate, block_size, eps,
            ptr(cos), ptr(sin), gemv, int8_gemv, norm, attend,
        )  # fmt: skip

    @property
    def has_int8(self) -> bool:
        return self.entry_points[1] is not None

    def scratch(self, model: Model, rows: int) -> torch.Tensor:
        return torch.empty(self.scratch_fn(ctypes.byref(model), rows), dtype=torch.bfloat16)

    def run(
        self,
        model: Model,
        layers: ctypes.Array[Layer],
        hidden: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scratch: torch.Tensor,
        timings: ctypes.Array[ctypes.c_double] | None = None,
    ) -> None:
        """hidden bf16 [M, H] (contiguous, updated in place); positions, seq_lens int64 [M];
        write_rows int64 [M * Hkv]; block_tables int64 [M, n_blk] contiguous; scratch from
        `scratch(model, >= M)`; timings: None, or PARTS doubles that each part's seconds
        are added to (profiling)."""
        status = self.fn(
            ctypes.byref(model),
            layers,
            len(layers),
            hidden.shape[0],
            hidden.data_ptr(),
            positions.data_ptr(),
            write_rows.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            seq_lens.data_ptr(),
            scratch.data_ptr(),
            torch.get_num_threads(),
            timings,
        )
        if status == -1:
            raise ValueError("llama decode kernel: unsupported shape")
        if status != 0:
            raise MemoryError("llama decode kernel: a kernel could not allocate its scratch")


def _address(lib: ctypes.CDLL, symbol: str) -> int:
    address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    assert address is not None
    return address


@functools.cache
def llama_decode() -> LlamaDecodeKernel | None:
    """The kernel, or None where it or one of the kernels it calls is unavailable."""
    if not build.enabled() or None in (
        bf16_gemv.bf16_gemv(),
        rms_norm.rms_norm(),
        paged_attention.paged_decode_attention(),
    ):
        return None
    libs = [
        build.load_for_cpu(name, REQUIRED_CPU_FLAGS)
        for name in ("llama_decode", "bf16_gemv", "rms_norm", "paged_decode_attention")
    ]
    lib, gemv_lib, norm_lib, attend_lib = libs
    if lib is None or gemv_lib is None or norm_lib is None or attend_lib is None:
        return None
    i64 = ctypes.c_int64
    fn = lib.pinnace_llama_decode_bf16
    fn.argtypes = [_ptr, ctypes.POINTER(Layer), i64, i64, _ptr, _ptr, _ptr, _ptr, i64, _ptr,
                   _ptr, ctypes.c_int, _ptr]  # fmt: skip
    fn.restype = ctypes.c_int
    scratch_fn = lib.pinnace_llama_decode_scratch
    scratch_fn.argtypes = [_ptr, i64]
    scratch_fn.restype = i64
    # int8 layers are optional: without VNNI they run the module path.
    int8_lib = None
    if int8_gemv.int8_gemv() is not None:
        int8_lib = build.load_for_cpu("int8_gemv", int8_gemv.REQUIRED_CPU_FLAGS)
    entry_points = (
        _address(gemv_lib, "pinnace_bf16_gemv"),
        None if int8_lib is None else _address(int8_lib, "pinnace_int8_gemv_bf16"),
        _address(norm_lib, "pinnace_rms_norm_bf16"),
        _address(attend_lib, "pinnace_paged_decode_bf16"),
    )
    return LlamaDecodeKernel(fn, scratch_fn, entry_points)


@functools.cache
def silu_and_mul() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """bf16 [M, 2I] gate | up (contiguous) -> bf16(bf16(silu(gate)) * up) [M, I], the
    native decode's SiLU-and-mul (its exp within 1 float32 ulp of libm's, so within a
    bf16 rounding of PyTorch's silu); None where the kernel is unavailable."""
    fn = build.native_function(
        "llama_decode", REQUIRED_CPU_FLAGS, "pinnace_silu_and_mul_bf16",
        [_ptr, ctypes.c_int64, ctypes.c_int64, _ptr, ctypes.c_int], None,
    )  # fmt: skip
    if fn is None:
        return None

    def run(gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        act = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        fn(gate_up.data_ptr(), rows, width // 2, act.data_ptr(), torch.get_num_threads())
        return act

    return run
