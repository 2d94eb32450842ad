"""The native paged decode attention (runtime/kernels/paged_decode_attention.c) against a
float64 reference on scattered blocks, and inside the torch backend against its matmul path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pinnace.runtime.kernels.paged_attention import (
    REQUIRED_CPU_FLAGS,
    Attend,
    paged_decode_attention,
)
from pinnace.runtime.layers.attention import AttentionBackend, BatchLayout
from pinnace.runtime.layers.attention.cpu_backend import CPUDecodeAttentionBackend
from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture
def attend(native_kernel: Callable[..., Attend]) -> Attend:
    return native_kernel(paged_decode_attention, REQUIRED_CPU_FLAGS)


def _paged_problem(
    seq_lens: list[int], heads: int, kv_heads: int, dim: int, bs: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, a cache in the backend's layout with each request's blocks scattered, and tables."""
    g = torch.Generator().manual_seed(seed)
    per_req = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(per_req) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(per_req), dtype=torch.long)
    start = 0
    for b, n in enumerate(per_req):
        tables[b, :n] = torch.tensor(order[start : start + n])
        start += n
    cache = (torch.randn(2, num_blocks * kv_heads, bs * dim, generator=g) * 2).bfloat16()
    q = torch.randn(len(seq_lens), heads, dim, generator=g).bfloat16()
    return q, cache, tables


def _reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: list[int],
    kv_heads: int,
    bs: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(seq_lens):
        first = max(0, n - window) if window else 0
        for h in range(heads):
            kv = h // (heads // kv_heads)
            rows = tables[b, : -(-n // bs)] * kv_heads + kv
            k = cache[0, rows].double().view(-1, dim)[first:n]
            v = cache[1, rows].double().view(-1, dim)[first:n]
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out


# (seq_lens, heads, kv_heads, dim, window)
CASES = pytest.mark.parametrize(
    "case",
    [
        ([1], 9, 3, 64, None),  # SmolLM2's grouping, first decode token
        ([100, 17, 1, 64], 9, 3, 64, None),
        ([40, 33], 4, 4, 128, None),  # no grouping, Qwen3's head size
        ([70, 5], 16, 2, 16, 8),  # group of 8, sliding window shorter than one sequence
    ],
)


def _kernel_and_reference(attend: Attend, case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    seq_lens, heads, kv_heads, dim, window = case
    bs, scale = 16, dim**-0.5
    q, cache, tables = _paged_problem(seq_lens, heads, kv_heads, dim, bs, seed=len(seq_lens))
    lens = torch.tensor(seq_lens)
    out = attend(q, cache[0], cache[1], tables, lens, kv_heads, bs, scale, window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    return out, _reference(q, cache, tables, seq_lens, kv_heads, bs, scale, window)


@CASES
def test_matches_float64_reference(attend: Attend, case: tuple) -> None:
    assert_rounded_from(*_kernel_and_reference(attend, case))


def assert_rounded_from(out: torch.Tensor, expected: torch.Tensor) -> None:
    # Only the final rounding to bf16 separates them (float32 inside).
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-6)


@CASES
def test_a_one_ulp_error_fails_the_reference_check(attend: Attend, case: tuple) -> None:
    """The check above is tight enough to see the kernel off by one ulp in every output."""
    out, expected = _kernel_and_reference(attend, case)
    off = (out.view(torch.int16) + 1).view(torch.bfloat16)  # one ulp away from zero
    with pytest.raises(AssertionError):
        assert_rounded_from(off, expected)


def test_backend_decode_agrees_with_its_matmul_path(attend: Attend) -> None:
    """The same step through the backend with and without the kernel: equal up to the
    matmul path's bf16 rounding of scores, and the K/V write happens in both."""
    heads, kv_heads, dim, bs = 9, 3, 64, 16
    seq_lens = [37, 5]
    q, cache, tables = _paged_problem(seq_lens, heads, kv_heads, dim, bs, seed=7)
    layout = BatchLayout(
        query_lens=[1, 1],
        num_computed_tokens=[n - 1 for n in seq_lens],
        block_tables=[t.tolist() for t in tables],
        block_size=bs,
        slot_mapping=torch.tensor(
            [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(seq_lens)]
        ),
        device=torch.device("cpu"),
    )
    k_new = torch.randn(2, kv_heads, dim).bfloat16()
    v_new = torch.randn(2, kv_heads, dim).bfloat16()
    outs = []
    for native in (True, False):
        backend: AttentionBackend = (
            CPUDecodeAttentionBackend(kv_heads, attend)
            if native
            else TorchAttentionBackend(kv_heads)
        )
        kv_cache = cache.clone().view(2, -1, kv_heads, dim)  # [2, slots, Hkv, D] storage
        meta = backend.build_metadata(layout)
        outs.append(backend.forward(q, k_new, v_new, kv_cache, meta, dim**-0.5, None))
        # The new token's K/V land where the kernel (and the float64 reference) read them:
        # row block * Hkv + h of the head-major cache, at the token's offset in the block.
        after = kv_cache.view(2, -1, bs, dim)
        expected = cache.view(2, -1, bs, dim).clone()
        for b, n in enumerate(seq_lens):
            block, offset = int(tables[b, (n - 1) // bs]), (n - 1) % bs
            rows = block * kv_heads + torch.arange(kv_heads)
            expected[0, rows, offset], expected[1, rows, offset] = k_new[b], v_new[b]
        assert not torch.equal(expected, cache.view(2, -1, bs, dim))
        assert torch.equal(after, expected), f"K/V write (native={native})"
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0.03, atol=0.02)
