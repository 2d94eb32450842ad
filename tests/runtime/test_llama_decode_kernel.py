"""The one-call native decode of a Llama stack (kernels/llama_decode.c via
models/llama_native.py) against the module path it replaces and a float64 evaluation of the
same bf16 (or int8) weights, on a tiny random model with scattered cache blocks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from pinnace.runtime.kernels.bf16_gemv import MAX_ROWS
from pinnace.runtime.kernels.int8_gemv import REQUIRED_CPU_FLAGS as INT8_CPU_FLAGS
from pinnace.runtime.kernels.int8_gemv import int8_gemv
from pinnace.runtime.kernels.llama_decode import REQUIRED_CPU_FLAGS, llama_decode, silu_and_mul
from pinnace.runtime.layers.attention import BatchLayout
from pinnace.runtime.layers.attention.cpu_backend import CPUDecodeAttentionBackend
from pinnace.runtime.layers.forward_context import ForwardContext, forward_context
from pinnace.runtime.layers.linear import PackedLinear, pack_linears
from pinnace.runtime.layers.quantization.convert import quantize_linears
from pinnace.runtime.models.llama import LlamaForCausalLM
from pinnace.runtime.models.llama_native import NativeLlamaDecode

pytestmark = pytest.mark.usefixtures("fresh_kernels")

BLOCK_SIZE = 4
NUM_BLOCKS = 24


def tiny_model(bias: bool, int8: bool = False, heads: int = 4) -> Any:
    """64 wide: 4 heads of 16 (2 KV heads), or 2 of 32 (1 KV head: the kernel's rotation
    then runs 16 lanes at a time, its scalar loop otherwise)."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=heads // 2, rms_norm_eps=1e-5,
        rope_theta=1e4,
        attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    model = LlamaForCausalLM(config, max_positions=128)
    for name, p in model.named_parameters():
        centre = 1.0 if "norm" in name else 0.0
        p.data = torch.randn(p.shape, generator=g) * 0.3 + centre
    model = model.to(torch.bfloat16)
    model.prepare(torch.device("cpu"))
    if int8:  # the layers' linears (not the embedding or head)
        paths = {n for n, m in model.named_modules() if ".layers." in n and m is not None}
        quantize_linears(model, "int8", torch.device("cpu"), only=paths)
    pack_linears(model)
    return model


def decode_step(
    seq_lens: list[int], kv_heads: int, head_dim: int, seed: int
) -> tuple[CPUDecodeAttentionBackend, Any, list[torch.Tensor], torch.Tensor]:
    """Attention metadata for one new token per request (its context scattered over random
    blocks), random caches for 3 layers, and the positions."""
    g = torch.Generator().manual_seed(seed)
    backend = CPUDecodeAttentionBackend.create(kv_heads)
    assert backend is not None
    order = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables, slots = [], []
    for n in seq_lens:
        blocks = [order.pop() for _ in range(-(-n // BLOCK_SIZE))]
        tables.append(blocks)
        slots.append(blocks[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE)
    layout = BatchLayout(
        query_lens=[1] * len(seq_lens),
        num_computed_tokens=[n - 1 for n in seq_lens],
        block_tables=tables,
        block_size=BLOCK_SIZE,
        slot_mapping=torch.tensor(slots),
        device=torch.device("cpu"),
    )
    shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim)
    caches = [torch.randn(shape, generator=g).bfloat16() for _ in range(3)]
    positions = torch.tensor([n - 1 for n in seq_lens])
    return backend, backend.build_metadata(layout), caches, positions


def module_path(model: Any, ctx: ForwardContext, positions: torch.Tensor, h: torch.Tensor) -> Any:
    with forward_context(ctx):
        for layer in model.model.layers:
            h = layer(positions, h)
    return h


def _norm64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w.double()


def _linear64(x: torch.Tensor, lin: Any) -> torch.Tensor:
    w = lin.plain if isinstance(lin, PackedLinear) else lin.dequantized_weight()
    y = x @ w.double().T
    return y if lin.bias is None else y + lin.bias.double()


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def float64_reference(
    model: Any, caches: list[torch.Tensor], meta: Any, positions: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """The same layers in float64 without intermediate rounding; caches: copies with the
    step's K/V still unwritten (written here, in float64)."""
    h = h.double()
    seq_lens = meta.seq_lens.tolist()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = _linear64(_norm64(h, layer.input_layernorm.weight), attn.qkv_proj)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        cos = attn.rotary[0].cos[positions].double()[:, None]
        sin = attn.rotary[0].sin[positions].double()[:, None]
        q = _rope64(q.reshape(-1, heads, dim), cos, sin)
        k = _rope64(k.reshape(-1, kv_heads, dim), cos, sin)
        v = v.reshape(-1, kv_heads, dim)
        cache = caches[attn.attn.layer_idx].double()  # [2, blocks, Hkv, bs, D]
        out = torch.empty(h.shape[0], heads, dim, dtype=torch.float64)
        for b, n in enumerate(seq_lens):
            blocks = meta.block_tables[b, : -(-n // BLOCK_SIZE)]
            ks = cache[0, blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n].clone()
            vs = cache[1, blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n].clone()
            ks[:, n - 1], vs[:, n - 1] = k[b], v[b]
            for head in range(heads):
                kv = head // (heads // kv_heads)
                p = torch.softmax(ks[kv] @ q[b, head] * attn.attn.scale, 0)
                out[b, head] = p @ vs[kv]
        h = h + _linear64(out.view(h.shape[0], -1), attn.o_proj)
        x = _norm64(h, layer.post_attention_layernorm.weight)
        gate, up = _linear64(x, mlp.gate_up_proj).chunk(2, -1)
        h = h + _linear64(torch.nn.functional.silu(gate) * up, mlp.down_proj)
    return h


@pytest.mark.parametrize(
    ("bias", "int8", "seq_lens", "heads"),
    [
        (False, False, [1], 4),
        (False, False, [9], 4),
        (False, False, [30, 5, 13], 4),
        (True, False, [9], 4),
        (True, False, [30, 5, 13], 4),
        (True, False, [20, 5, 13, 2, 9, 7, 4, 11], 4),  # the GEMV's 8 rows (AMX if present)
        (True, False, [20, 5, 13, 2, 9, 7, 4, 11], 2),  # head_dim 32
        (False, True, [9], 4),
        (True, True, [30, 5], 4),  # int8: at most the int8 GEMV's 2 rows
    ],
)
def test_matches_module_path_and_float64(
    native_kernel: Callable[..., Any], bias: bool, int8: bool, seq_lens: list[int], heads: int
) -> None:
    native_kernel(llama_decode, REQUIRED_CPU_FLAGS)
    if int8:
        native_kernel(int8_gemv, INT8_CPU_FLAGS)
    model = tiny_model(bias, int8, heads)
    native = NativeLlamaDecode.create(list(model.model.layers), None)
    assert native is not None
    head_dim = 64 // heads
    backend, meta, caches, positions = decode_step(
        seq_lens, heads // 2, head_dim, seed=len(seq_lens)
    )
    h0 = torch.randn(len(seq_lens), 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    reference = float64_reference(model, caches, meta, positions, h0)
    module_caches = [c.clone() for c in caches]
    expected = module_path(model, ForwardContext(backend, meta, module_caches), positions, h0)
    got = h0.clone()
    assert native.run(ForwardContext(backend, meta, caches), positions, got)
    # The same bf16 roundings as the module path: equal but for SiLU's exp (libm vs SLEEF,
    # within a float32 ulp), which may flip an occasional bf16 rounding.
    for c, m in zip(caches, module_caches, strict=True):
        assert torch.equal(c, m)  # rotated K and V written to the same slots
    ulp = 2.0 ** (torch.floor(torch.log2(expected.float().abs())) - 7)
    assert ((got.float() - expected.float()).abs() <= 2 * ulp).all()
    assert (got == expected).float().mean() > 0.95
    error = (got.double() - reference).abs().mean().item()
    module_error = (expected.double() - reference).abs().mean().item()
    assert error <= 1.1 * module_error + 1e-6
    assert error < 0.02 * reference.abs().mean().item()
    assert math.isfinite(error)


@pytest.mark.parametrize(
    ("computed", "query"),
    [([6, 9], [3, 1]), ([6], [5]), ([5, 2], [6, 2]), ([3], [8])],
)  # verifications of 2 + a decode row, 4, 5 + 1, 7 proposals: 4, 5, 8, 8 kernel rows
def test_several_tokens_of_a_request_attend_causally(
    native_kernel: Callable[..., Any], computed: list[int], query: list[int]
) -> None:
    """A speculative verification (e.g. 3 tokens after 6 cached) next to a decode row: one
    kernel row per token, each seeing exactly the tokens before it in the step. The
    reference is the same kernel fed the tokens one decode step at a time (future slots
    then still hold the cache's random data, so a token that saw later ones would differ),
    and the module path fed them so agrees as decode rows do."""
    native_kernel(llama_decode, REQUIRED_CPU_FLAGS)
    model = tiny_model(bias=True)
    native = NativeLlamaDecode.create(list(model.model.layers), None)
    assert native is not None
    g = torch.Generator().manual_seed(5)
    backend = CPUDecodeAttentionBackend.create(2)
    assert backend is not None
    order = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = [
        [order.pop() for _ in range(-(-(c + q) // BLOCK_SIZE))]
        for c, q in zip(computed, query, strict=True)
    ]
    new = [
        (b, p)
        for b, (c, q) in enumerate(zip(computed, query, strict=True))
        for p in range(c, c + q)
    ]
    slots = [tables[b][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for b, p in new]

    def step(lens: list[int], done: list[int], rows: list[int], which: list[int]) -> Any:
        return backend.build_metadata(
            BatchLayout(
                query_lens=lens,
                num_computed_tokens=done,
                block_tables=[tables[b] for b in which],
                block_size=BLOCK_SIZE,
                slot_mapping=torch.tensor([slots[r] for r in rows]),
                device=torch.device("cpu"),
            )
        )

    shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, 2, 16)
    caches = [torch.randn(shape, generator=g).bfloat16() for _ in range(3)]
    positions = torch.tensor([p for _, p in new])
    h0 = torch.randn(len(new), 64, generator=g).bfloat16()
    one_by_one_caches = [c.clone() for c in caches]
    module_caches = [c.clone() for c in caches]
    caches0 = [c.clone() for c in caches]
    meta = step(query, computed, list(range(len(new))), list(range(len(query))))
    got = h0.clone()
    assert native.run(ForwardContext(backend, meta, caches), positions, got)
    for r, (b, p) in enumerate(new):
        row = h0[r : r + 1].clone()
        ctx = ForwardContext(backend, step([1], [p], [r], [b]), one_by_one_caches)
        assert native.run(ctx, positions[r : r + 1], row)
        assert torch.equal(row, got[r : r + 1]), f"token {r} (position {p})"
    for c, o in zip(caches, one_by_one_caches, strict=True):
        assert torch.equal(c, o)
    # The module path fed one decode step at a time: the same roundings (as in the test
    # above); fed the whole step it attends through SDPA, another summation order.
    decode_rows = []
    for r, (b, p) in enumerate(new):
        ctx = ForwardContext(backend, step([1], [p], [r], [b]), module_caches)
        decode_rows.append(module_path(model, ctx, positions[r : r + 1], h0[r : r + 1]))
    expected = torch.cat(decode_rows)
    ulp = 2.0 ** (torch.floor(torch.log2(expected.float().abs())) - 7)
    assert ((got.float() - expected.float()).abs() <= 2 * ulp).all()
    assert (got == expected).float().mean() > 0.95
    whole = module_path(model, ForwardContext(backend, meta, caches0), positions, h0)
    gap = (got.float() - whole.float()).abs().mean() / whole.float().abs().mean()
    assert gap < 0.02


def test_only_decode_rows_of_plain_llama_layers(native_kernel: Callable[..., Any]) -> None:
    native_kernel(llama_decode, REQUIRED_CPU_FLAGS)
    model = tiny_model(bias=False)
    native = NativeLlamaDecode.create(list(model.model.layers), None)
    assert native is not None
    lens = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    backend, meta, caches, positions = decode_step(lens, 2, 16, seed=0)
    h = torch.zeros(len(lens), 64, dtype=torch.bfloat16)
    assert len(lens) > MAX_ROWS  # the module path's steps (a verification of 8 proposals)
    assert not native.run(ForwardContext(backend, meta, caches), positions, h)
    assert not native.run(None, positions[:1], h[:1])  # no forward context
    int8_native = NativeLlamaDecode.create(list(tiny_model(False, int8=True).model.layers), None)
    if int8_native is not None:  # where the int8 GEMV is available: at most 2 rows
        ctx = ForwardContext(backend, meta, caches)
        assert not int8_native.run(ctx, positions[:3], h[:3])
    assert NativeLlamaDecode.create(list(model.model.layers), 2.0) is None  # scaled embeddings
    hook = model.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, out: out)
    assert NativeLlamaDecode.create(list(model.model.layers), None) is None  # TP's all-reduce
    hook.remove()
    model.model.layers[1].self_attn.q_norm = torch.nn.Identity()  # Qwen3-style q/k norm
    assert NativeLlamaDecode.create(list(model.model.layers), None) is None


def test_unavailable_without_native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINNACE_NATIVE_KERNELS", "0")
    assert llama_decode() is None
    model = tiny_model(bias=False)
    assert NativeLlamaDecode.create(list(model.model.layers), None) is None


def test_silu_and_mul_is_pytorchs_within_one_bf16_rounding(
    native_kernel: Callable[..., Any],
) -> None:
    """The module path's native SiLU-and-mul (prefill rows): bf16(bf16(silu(g)) * u) as
    PyTorch rounds it, except where the float32 exp's last bit moves a rounding (one bf16
    step); a width of 100 covers the 16-lane loop and its scalar tail."""
    fn = native_kernel(silu_and_mul, REQUIRED_CPU_FLAGS)
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(70, 200, generator=g) * 4).bfloat16()
    gate, up = gate_up.split(100, -1)
    expected = torch.nn.functional.silu(gate) * up
    out = fn(gate_up)
    assert out.shape == (70, 100)
    differ = out != expected
    assert differ.float().mean() < 0.01
    step = expected.float().abs().clamp(min=1e-30) * 2**-7  # one bf16 step, at most
    assert bool(((out.float() - expected.float()).abs() <= step).all())
    assert not torch.equal(out, (torch.nn.functional.silu(up) * gate))  # halves not swapped
