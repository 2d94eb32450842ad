"""The native INT8 GEMV (runtime/kernels/int8_gemv.c): exact against a float64 reference,
robust to outliers, zeros and NaN, used by Int8Linear for decode rows, optional, and
the same greedy tokens as PyTorch's int8 kernel on the real model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.kernels.int8_gemv import REQUIRED_CPU_FLAGS, Gemv, int8_gemv
from pinnace.runtime.layers.quantization import int8 as int8_module
from pinnace.runtime.layers.quantization.int8 import Int8Linear, quantize_int8

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture
def gemv(native_kernel: Callable[..., Gemv]) -> Gemv:
    return native_kernel(int8_gemv, REQUIRED_CPU_FLAGS)


def _problem(rows: int, cols: int, outs: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    codes, scale = quantize_int8(torch.randn(outs, cols, generator=g) * 0.05)
    x = torch.randn(rows, cols, generator=g).bfloat16()
    return x, codes, scale.bfloat16().float(), codes.sum(1, dtype=torch.int32)


def _reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ codes.double().T * scale.double()).to(torch.bfloat16)


def _assert_exact(
    out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, share: float
) -> None:
    """Within 1 bf16 ulp (double rounding through float32) plus the 24-bit activation
    rounding (2^-23 of max|x| per unit of sum|w|) of the correctly rounded result, and equal
    to it in at least `share` of the outputs."""
    o, r = out.double(), ref.double()
    fixed = x.double().abs().amax(1, keepdim=True) * codes.double().abs().sum(1) * 2.0**-22
    assert ((o - r).abs() <= r.abs() * 2.0**-8 + fixed).all()
    assert (out == ref).double().mean() >= share


@pytest.mark.parametrize(
    ("rows", "cols", "outs"),
    [(1, 576, 960), (2, 1536, 576), (1, 100, 7), (2, 64, 1), (1, 8192, 33), (1, 16, 4)],
)
def test_matches_float64_reference(gemv: Gemv, rows: int, cols: int, outs: int) -> None:
    x, codes, scale, rowsum = _problem(rows, cols, outs)
    out = gemv(x, codes, scale, rowsum)
    assert out.shape == (rows, outs) and out.dtype == torch.bfloat16
    _assert_exact(out, _reference(x, codes, scale), x, codes, 0.99)


def test_outliers_zero_and_nan_rows(gemv: Gemv) -> None:
    x, codes, scale, rowsum = _problem(2, 576, 64)
    # A massive activation 10^5 times the rest: the 24-bit row scale still resolves the rest.
    x[0] = torch.randn(576).bfloat16() * 1e-2
    x[0, 17] = 1e3
    _assert_exact(gemv(x, codes, scale, rowsum), _reference(x, codes, scale), x, codes, 0.95)
    x[1] = 0
    assert (gemv(x, codes, scale, rowsum)[1] == 0).all()
    x[1, 3] = float("nan")
    out = gemv(x, codes, scale, rowsum)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_int8_linear_uses_it_for_decode_rows_only(gemv: Gemv) -> None:
    w = torch.randn(96, 576)
    layer = Int8Linear(*quantize_int8(w), None, torch.bfloat16)
    assert "native_vnni" in layer.extra_repr()
    calls = []
    native = layer.native
    assert native is not None

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return native(*args)

    layer.native = counting
    weight_l1 = float(layer.dequantized_weight().abs().sum(1).max())
    for rows in (1, 2, 3, 8):
        x = torch.randn(rows, 576).bfloat16()
        ref = torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
        # Above 2 rows the two-digit int8 GEMM (test_int8_digits_kernel) carries activations
        # to max|x| / 64516, not exactly.
        atol = 1e-3 if rows <= 2 else float(x.float().abs().max()) / 64516 * weight_l1
        torch.testing.assert_close(layer(x), ref, rtol=2**-7, atol=atol)
    assert calls == [1, 2]
    # fp32 layers, and models on other devices, never take it.
    assert Int8Linear(*quantize_int8(w), None, torch.float32).native is None


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINNACE_NATIVE_KERNELS", "0")
    assert int8_gemv() is None
    layer = Int8Linear(*quantize_int8(torch.randn(32, 64)), None, torch.bfloat16)
    assert layer.native is None and "native" not in layer.extra_repr()


@pytest.mark.slow
def test_real_model_greedy_tokens_equal_pytorch_int8_kernel(
    gemv: Gemv, smollm2_gguf: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch-1 decode (max_num_seqs=1) takes the native kernel; the same model through
    aten._weight_int8pack_mm gives the same greedy tokens (but for near-ties)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run() -> tuple[list[list[int]], int]:
        llm = LLM(smollm2_gguf, dtype="bfloat16", quantization="int8", max_num_seqs=1,
                  kv_cache_memory=64 * 2**20, max_model_len=256)  # fmt: skip
        model: nn.Module = llm.llm_engine.parts.runner.model
        native = sum(isinstance(m, Int8Linear) and m.native is not None for m in model.modules())
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], native

    tokens, native_layers = run()
    assert native_layers == 30 * 4 + 1  # every linear and the tied head
    # Only the int8 kernel off (the environment switch would also change attention).
    monkeypatch.setattr(int8_module, "int8_gemv", lambda: None)
    reference, none = run()
    assert none == 0
    # Both compute the same products; only float32 vs exact integer accumulation differs, which
    # can flip a near-tie (seen once in 72 tokens), so positions must agree, not all of them.
    pairs = [
        (a, b)
        for ours, ref in zip(tokens, reference, strict=True)
        for a, b in zip(ours, ref, strict=True)
    ]
    assert all(t[:8] == r[:8] for t, r in zip(tokens, reference, strict=True))
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)
