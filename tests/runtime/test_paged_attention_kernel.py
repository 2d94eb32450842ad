"""The native paged decode attention (runtime/kernels/paged_decode_attention.c) against a
float64 reference on scattered blocks, and inside the torch backend against its matmul path;
both variants (AVX-512 BF16 dot products, plain AVX-512)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from pinnace.runtime.kernels import build
from pinnace.runtime.kernels.paged_attention import (
    BF16_DOT_FLAGS,
    REQUIRED_CPU_FLAGS,
    Attend,
    RopeAttend,
    paged_decode_attention,
    rope_decode_attention,
    rope_write,
)
from pinnace.runtime.layers.attention import AttentionBackend, BatchLayout
from pinnace.runtime.layers.attention.cpu_backend import (
    CPUDecodeAttentionBackend,
    per_token_pays,
)
from pinnace.runtime.layers.attention.fp8_kv import write_kv
from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend
from pinnace.runtime.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture(params=[True, False], ids=["bf16_dot", "avx512"])
def attend(request: pytest.FixtureRequest, native_kernel: Callable[..., Attend]) -> Attend:
    dot: bool = request.param
    flags = REQUIRED_CPU_FLAGS + (BF16_DOT_FLAGS if dot else ())

    def lookup() -> Attend | None:
        # None (a skip naming the missing flag) rather than the plain variant again.
        if dot and not set(BF16_DOT_FLAGS) <= build.cpu_flags():
            return None
        return paged_decode_attention(bf16_dot=dot)

    return native_kernel(lookup, flags)


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
        ([200, 129, 31], 6, 3, 80, None),  # a 16-wide tail past whole 32-lane chunks
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


def _mixed_step(
    dtype: torch.dtype, kv_heads: int, dim: int, bs: int
) -> tuple[BatchLayout, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decodes around a 5-token prompt chunk and a 3-row speculative verification: the
    layout, q/k/v of the step's 10 rows and a [2, slots, Hkv, D] cache of scattered blocks."""
    heads = kv_heads * 3
    seq_lens = [37, 9, 5, 20, 12]  # after this step
    query_lens = [1, 5, 1, 3, 1]
    _, cache, tables = _paged_problem(seq_lens, heads, kv_heads, dim, bs, seed=11)
    slots = [
        int(tables[b, p // bs]) * bs + p % bs
        for b, (n, ql) in enumerate(zip(seq_lens, query_lens, strict=True))
        for p in range(n - ql, n)
    ]
    layout = BatchLayout(
        query_lens=query_lens,
        num_computed_tokens=[n - ql for n, ql in zip(seq_lens, query_lens, strict=True)],
        block_tables=[t.tolist() for t in tables],
        block_size=bs,
        slot_mapping=torch.tensor(slots),
        device=torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(3)
    rows = sum(query_lens)
    q, k, v = (
        torch.randn(rows, n, dim, generator=g).to(dtype) for n in (heads, kv_heads, kv_heads)
    )
    return layout, q, k, v, cache.to(dtype).view(2, -1, kv_heads, dim)


def test_mixed_step_splits_decode_rows_to_the_kernel(attend: Attend) -> None:
    """A step mixing decodes with longer queries: decode rows (and only those) go through
    the kernel, the output matches the unsplit padded-SDPA path, and every row's K/V lands."""
    kv_heads, dim, bs = 3, 64, 16
    layout, q, k, v, cache = _mixed_step(torch.bfloat16, kv_heads, dim, bs)
    calls: list[torch.Tensor] = []

    def spy(q_rows: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q_rows.clone())
        return attend(q_rows, *args)  # type: ignore[arg-type]

    outs, caches = [], []
    split_only = CPUDecodeAttentionBackend(kv_heads, spy, per_token=False)
    for backend in (split_only, TorchAttentionBackend(kv_heads)):
        kv_cache = cache.clone()
        meta = backend.build_metadata(layout)
        outs.append(backend.forward(q, k, v, kv_cache, meta, dim**-0.5, None))
        caches.append(kv_cache)
    decode_rows = [0, 6, 10]  # flat rows of the one-token requests
    assert len(calls) == 1 and torch.equal(calls[0], q[decode_rows])
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0.03, atol=0.02)
    # The longer queries' rows are the torch backend's SDPA on a smaller batch.
    others = [r for r in range(q.shape[0]) if r not in decode_rows]
    torch.testing.assert_close(outs[0][others], outs[1][others], rtol=0.016, atol=0.01)

    # Where the kernel does not apply (soft-capped scores), the step stays unsplit.
    calls.clear()
    for per_token in (False, True):
        backend = CPUDecodeAttentionBackend(kv_heads, spy, per_token=per_token)
        meta = backend.build_metadata(layout)
        backend.forward(q, k, v, cache.clone(), meta, dim**-0.5, None, 30.0)
    assert not calls


def test_short_context_step_goes_row_by_row_to_the_kernel(attend: Attend) -> None:
    """Where the contexts are short, the whole mixed step is one kernel call with a row per
    token (keys up to its own position): same K/V as the torch backend, output within
    bf16 of its padded SDPA. A step of long prompts stays on SDPA."""
    kv_heads, dim, bs = 3, 64, 16
    layout, q, k, v, cache = _mixed_step(torch.bfloat16, kv_heads, dim, bs)
    calls: list[tuple[torch.Tensor, ...]] = []

    def spy(q_rows: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append((q_rows.clone(), args[2], args[3]))
        return attend(q_rows, *args)

    outs, caches = [], []
    for backend in (CPUDecodeAttentionBackend(kv_heads, spy), TorchAttentionBackend(kv_heads)):
        kv_cache = cache.clone()
        meta = backend.build_metadata(layout)
        outs.append(backend.forward(q, k, v, kv_cache, meta, dim**-0.5, None))
        caches.append(kv_cache)
    assert len(calls) == 1 and torch.equal(calls[0][0], q)
    # Each row's position + 1: the 5-token chunk covers positions 4..8, the 3 rows 17..19.
    assert calls[0][2].tolist() == [37, 5, 6, 7, 8, 9, 5, 18, 19, 20, 12]
    assert calls[0][1][1].tolist() == calls[0][1][5].tolist()  # rows of one request
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0.03, atol=0.02)

    long_prompt = BatchLayout(
        query_lens=[300],
        num_computed_tokens=[0],
        block_tables=[list(range(19))],
        block_size=bs,
        slot_mapping=torch.arange(300),
        device=torch.device("cpu"),
    )
    assert not per_token_pays(long_prompt)
    # Decode rows with long contexts beside it do not tip it over (they are the kernel's
    # under the split anyway).
    with_decodes = BatchLayout(
        query_lens=[300] + [1] * 32,
        num_computed_tokens=[0] + [1000] * 32,
        block_tables=[list(range(19))] + [list(range(63))] * 32,
        block_size=bs,
        slot_mapping=torch.arange(332),
        device=torch.device("cpu"),
    )
    assert not per_token_pays(with_decodes)
    meta = CPUDecodeAttentionBackend(kv_heads, spy).build_metadata(long_prompt)
    assert meta.per_token is None and meta.from_scratch


def test_mixed_step_float32_is_the_unsplit_path(attend: Attend) -> None:
    """float32 (which the kernel does not read) keeps the torch backend's output exactly; the
    split's sub-batch of longer queries gives those rows' float32 values on its own."""
    kv_heads, dim, bs = 2, 32, 8
    layout, q, k, v, cache = _mixed_step(torch.float32, kv_heads, dim, bs)
    outs = []
    native = CPUDecodeAttentionBackend(kv_heads, attend, per_token=False)
    for backend in (native, TorchAttentionBackend(kv_heads)):
        meta = backend.build_metadata(layout)
        outs.append(backend.forward(q, k, v, cache.clone(), meta, dim**-0.5, 4))
    assert torch.equal(outs[0], outs[1])
    split = native.build_metadata(layout).split
    assert split is not None and split.other_rows.tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    written = cache.clone()
    native.forward(q, k, v, written, native.build_metadata(layout), dim**-0.5, 4)
    rows = split.other_rows
    alone = native._attend(q[rows], written, split.other, dim**-0.5, 4, None)
    torch.testing.assert_close(alone, outs[1][rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("seq_lens", "heads", "kv_heads", "dim", "window"),
    [([100, 17, 1, 64], 9, 3, 64, None), ([40, 33, 90], 4, 4, 128, 32)],
)
def test_rope_decode_equals_rotate_write_then_attend(
    native_kernel: Callable[..., RopeAttend],
    seq_lens: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    window: int | None,
) -> None:
    """The fused call's q/k are RotaryEmbedding.rotate's bit for bit: the cache it leaves
    equals the PyTorch write of the rotated k and v, and its output the kernel's on the
    rotated q (itself checked against float64 above). qkv is a strided view."""
    rope_attend = native_kernel(rope_decode_attention, REQUIRED_CPU_FLAGS + BF16_DOT_FLAGS)
    bs = 16
    _, cache, tables = _paged_problem(seq_lens, heads, kv_heads, dim, bs, seed=5)
    batch, width = len(seq_lens), (heads + 2 * kv_heads) * dim
    g = torch.Generator().manual_seed(9)
    qkv = (torch.randn(batch, width + 48, generator=g) * 3).bfloat16()[:, :width]
    positions = torch.tensor(seq_lens) - 1
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, head_dim=dim)
    rotary = RotaryEmbedding(config, dim, max_positions=128)
    slots = [int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(seq_lens)]
    write_rows = torch.tensor(
        [((s // bs) * kv_heads + h) * bs + s % bs for s in slots for h in range(kv_heads)]
    )
    lens, scale = torch.tensor(seq_lens), dim**-0.5

    fused_cache = cache.clone()
    out = rope_attend(
        qkv, positions, rotary.cos, rotary.sin, write_rows, fused_cache[0], fused_cache[1],
        tables, lens, heads, kv_heads, bs, scale, window,
    )  # fmt: skip

    qk = rotary.rotate(positions, qkv[:, : (heads + kv_heads) * dim].reshape(batch, -1, dim))
    q_rot, k_rot = qk.split([heads, kv_heads], dim=1)
    v = qkv[:, (heads + kv_heads) * dim :].reshape(-1, dim)
    expected_cache = cache.clone()
    write_kv(expected_cache[0].view(-1, dim), write_rows, k_rot.reshape(-1, dim))
    write_kv(expected_cache[1].view(-1, dim), write_rows, v)
    assert not torch.equal(expected_cache, cache)
    assert torch.equal(fused_cache, expected_cache)
    attend = paged_decode_attention(bf16_dot=True)
    assert attend is not None
    expected = attend(
        q_rot, expected_cache[0], expected_cache[1], tables, lens, kv_heads, bs, scale, window
    )
    assert torch.equal(out, expected)


def test_rope_write_equals_rotate_then_write(native_kernel: Callable[..., Any]) -> None:
    """A prefill step's native rotary + K/V write: q and the cache bit-equal to
    RotaryEmbedding.rotate and write_kv, for several tokens per request from a strided qkv."""
    write = native_kernel(rope_write, REQUIRED_CPU_FLAGS + BF16_DOT_FLAGS)
    heads, kv_heads, dim, bs, tokens = 6, 2, 64, 8, 21
    g = torch.Generator().manual_seed(4)
    width = (heads + 2 * kv_heads) * dim
    qkv = (torch.randn(tokens, width + 32, generator=g) * 3).bfloat16()[:, :width]
    positions = torch.cat((torch.arange(3, 16), torch.arange(8)))  # a chunk and a prompt
    slots = torch.randperm(8 * bs, generator=g)[:tokens]
    write_rows = (((slots // bs) * kv_heads)[:, None] + torch.arange(kv_heads)) * bs
    write_rows = (write_rows + (slots % bs)[:, None]).reshape(-1)
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, head_dim=dim)
    rotary = RotaryEmbedding(config, dim, max_positions=32)
    cache = torch.zeros(2, 8 * kv_heads, bs * dim, dtype=torch.bfloat16)

    written = cache.clone()
    q = write(qkv, positions, rotary.cos, rotary.sin, write_rows, written[0], written[1],
              heads, kv_heads)  # fmt: skip

    qk = rotary.rotate(positions, qkv[:, : (heads + kv_heads) * dim].reshape(tokens, -1, dim))
    q_rot, k_rot = qk.split([heads, kv_heads], dim=1)
    expected = cache.clone()
    write_kv(expected[0].view(-1, dim), write_rows, k_rot.reshape(-1, dim))
    v = qkv[:, (heads + kv_heads) * dim :].reshape(-1, dim)
    write_kv(expected[1].view(-1, dim), write_rows, v)
    assert torch.equal(q, q_rot)
    assert not torch.equal(expected, cache)
    assert torch.equal(written, expected)


def test_prompts_from_scratch_are_causal_sdpa_without_a_mask() -> None:
    """Prompts with no KV before the step take SDPA's is_causal; their rows equal the
    masked call's (float32, padded to the longest prompt, blocks scattered)."""
    kv_heads, heads, dim, bs, lens = 2, 4, 32, 4, [5, 3, 8]
    _, cache, tables = _paged_problem(lens, heads, kv_heads, dim, bs, seed=2)
    slots = [int(tables[b, p // bs]) * bs + p % bs for b, n in enumerate(lens) for p in range(n)]
    layout = BatchLayout(
        query_lens=lens,
        num_computed_tokens=[0, 0, 0],
        block_tables=[t.tolist() for t in tables],
        block_size=bs,
        slot_mapping=torch.tensor(slots),
        device=torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(sum(lens), n, dim, generator=g) for n in (heads, kv_heads, kv_heads))
    backend, kv_cache = TorchAttentionBackend(kv_heads), cache.float().view(2, -1, kv_heads, dim)
    outs = []
    for from_scratch in (True, False):
        meta = backend.build_metadata(layout)
        assert meta.from_scratch
        meta.from_scratch = from_scratch
        outs.append(backend.forward(q, k, v, kv_cache.clone(), meta, dim**-0.5, None))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    layout.num_computed_tokens = [0, 1, 0]
    assert not backend.build_metadata(layout).from_scratch
