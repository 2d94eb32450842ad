"""Python side of paged_decode_attention.c: decode attention read from the paged KV cache.

    attend = paged_decode_attention()   # None when the kernel is unavailable here
    out = attend(q, k_rows, v_rows, block_tables, seq_lens, num_kv_heads, block_size, scale,
                 window)

q: bfloat16 [B, H, D] (one query per request); k_rows / v_rows: a layer's K and V as
[num_blocks * Hkv, block_size * D] head-major rows; block_tables: int64 [B, n_blk];
seq_lens: int64 [B]. Returns bfloat16 [B, H, D].

Where the CPU has AVX-512 BF16 the kernel's vdpbf16ps variant is used (about 2.5x fewer
instructions per context token, the same float32 arithmetic up to summation order);
`paged_decode_attention(bf16_dot=False)` is the plain AVX-512 one on any such CPU.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Protocol

import torch

from pinnace.runtime.kernels import build

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
BF16_DOT_FLAGS = ("avx512_bf16",)  # for the vdpbf16ps variant
MAX_GROUP = 16  # query heads per KV head (the kernel's limit)
MAX_HEAD_DIM = 256

Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, float,
     int | None],
    torch.Tensor,
]  # fmt: skip


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return (
        num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and head_dim % 16 == 0
        and head_dim <= MAX_HEAD_DIM
    )


@functools.cache
def paged_decode_attention(bf16_dot: bool = True) -> Attend | None:
    """The kernel (None where it cannot run); `bf16_dot`: its AVX-512 BF16 variant where
    the CPU has it."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    dot = bf16_dot and set(BF16_DOT_FLAGS) <= build.cpu_flags()
    fn = build.native_function(
        "paged_decode_attention",
        REQUIRED_CPU_FLAGS + (BF16_DOT_FLAGS if dot else ()),
        "pinnace_paged_decode_bf16dp" if dot else "pinnace_paged_decode_bf16",
        [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_float, i64, ptr,
         ctypes.c_int],
        ctypes.c_int,
    )  # fmt: skip
    if fn is None:
        return None

    def attend(
        q: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        num_kv_heads: int,
        block_size: int,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        q = q.contiguous()
        batch, heads, head_dim = q.shape
        out = torch.empty_like(q)
        status = fn(
            q.data_ptr(),
            k_rows.data_ptr(),
            v_rows.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            seq_lens.data_ptr(),
            batch,
            heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            window or 0,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status == -1:
            raise ValueError(f"paged attention kernel: unsupported shape {tuple(q.shape)}")
        if status != 0:
            raise MemoryError("paged attention kernel could not allocate its scratch buffer")
        return out

    return attend


class RopeAttend(Protocol):
    def __call__(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_rows: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        block_size: int,
        scale: float,
        window: int | None,
    ) -> torch.Tensor: ...


def rope_supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return supports(num_heads, num_kv_heads, head_dim) and head_dim % 32 == 0


def _check_rope_inputs(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    kernel: str,
) -> None:
    """The layout the rotary kernels read: unit-stride q | k | v rows, float32 tables."""
    head_dim = cos.shape[-1]
    if (
        qkv.stride(1) != 1
        or qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim
        or not (cos.is_contiguous() and sin.is_contiguous())
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
    ):
        raise ValueError(f"{kernel}: unsupported qkv or tables")


@functools.cache
def rope_decode_attention() -> RopeAttend | None:
    """A decode layer from its qkv projection on, in one call: rotary on q and k (bit-equal
    to RotaryEmbedding.rotate), k/v written to the cache, then the kernel's BF16 variant;
    None where that variant is unavailable.

        out = rope_attend(qkv, positions, cos, sin, write_rows, k_rows, v_rows,
                          block_tables, seq_lens, num_heads, num_kv_heads, block_size,
                          scale, window)

    qkv: bfloat16 [B, >= (H + 2 Hkv) * D] rows (unit stride within a row), q | k | v of
    one token per request; positions: int64 [B] rows of cos / sin (float32 [P, D], HF's
    unsigned sin); write_rows: int64 [B * Hkv], the torch backend's rows of the
    [slots * Hkv, D] cache view. Returns bfloat16 [B, H, D].
    """
    if not set(BF16_DOT_FLAGS) <= build.cpu_flags():
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = build.native_function(
        "paged_decode_attention", REQUIRED_CPU_FLAGS + BF16_DOT_FLAGS,
        "pinnace_rope_decode_bf16dp",
        [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64,
         ctypes.c_float, i64, ptr, ctypes.c_int],
        ctypes.c_int,
    )  # fmt: skip
    if fn is None:
        return None

    def rope_attend(
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_rows: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        block_size: int,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        batch, head_dim = qkv.shape[0], cos.shape[-1]
        _check_rope_inputs(qkv, cos, sin, num_heads, num_kv_heads, "rope decode kernel")
        q_out = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype)
        out = torch.empty_like(q_out)
        status = fn(
            qkv.data_ptr(), qkv.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            write_rows.data_ptr(), q_out.data_ptr(), k_rows.data_ptr(), v_rows.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), batch,
            num_heads, num_kv_heads, head_dim, block_size, scale, window or 0, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status == -1:
            raise ValueError(f"rope decode kernel: unsupported shape {tuple(q_out.shape)}")
        if status != 0:
            raise MemoryError("rope decode kernel could not allocate its scratch buffer")
        return out

    return rope_attend


RopeWrite = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
     torch.Tensor, int, int],
    torch.Tensor,
]  # fmt: skip


@functools.cache
def rope_write() -> RopeWrite | None:
    """Rotary on q and k (bit-equal to RotaryEmbedding.rotate) and the k/v write to the
    cache for every token of a step, without attention; None where unavailable.

        q = rope_write(qkv, positions, cos, sin, write_rows, k_rows, v_rows, num_heads,
                       num_kv_heads)

    Arguments as rope_decode_attention's, for any number of tokens per request. Returns
    the rotated queries, bfloat16 [T, H, D].
    """
    if not set(BF16_DOT_FLAGS) <= build.cpu_flags():
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = build.native_function(
        "paged_decode_attention", REQUIRED_CPU_FLAGS + BF16_DOT_FLAGS,
        "pinnace_rope_write_bf16",
        [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int],
        ctypes.c_int,
    )  # fmt: skip
    if fn is None:
        return None

    def write(
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_rows: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:
        tokens, head_dim = qkv.shape[0], cos.shape[-1]
        _check_rope_inputs(qkv, cos, sin, num_heads, num_kv_heads, "rope write kernel")
        q_out = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype)
        status = fn(
            qkv.data_ptr(), qkv.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            write_rows.data_ptr(), q_out.data_ptr(), k_rows.data_ptr(), v_rows.data_ptr(),
            tokens, num_heads, num_kv_heads, head_dim, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"rope write kernel: unsupported shape {tuple(q_out.shape)}")
        return q_out

    return write
