"""The int8 x int8 GEMM for large row counts (runtime/kernels/int8_digits.c + oneDNN): within
the two activation digits' rounding of a float64 reference, robust to outliers, zeros and
NaN, used by Int8Linear above the native GEMV's 2 rows, and optional."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pinnace.runtime.kernels import int8_digits
from pinnace.runtime.kernels.int8_digits import REQUIRED_CPU_FLAGS, DigitsMatmul, int8_digits_matmul
from pinnace.runtime.layers.linear import weight_bytes
from pinnace.runtime.layers.quantization.int8 import KERNEL_MAX_ROWS, Int8Linear, quantize_int8

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture
def matmul(native_kernel: Callable[..., DigitsMatmul]) -> DigitsMatmul:
    return native_kernel(int8_digits_matmul, REQUIRED_CPU_FLAGS)


def _problem(rows: int, cols: int, outs: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    codes, scale = quantize_int8(torch.randn(outs, cols, generator=g) * 0.05)
    # Channels of very different sizes, as RMSNorm outputs have.
    x = torch.randn(rows, cols, generator=g) * torch.rand(cols, generator=g).pow(4) * 8
    return x.bfloat16(), codes, scale.bfloat16().float()


def _assert_close(out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor):
    """|out - x @ (scale codes)^T| <= the digits' rounding (max|x| / (127 * 508) per unit of
    sum|w|) plus the final bf16 rounding, against float64."""
    w = codes.double() * scale.double()[:, None]
    ref = x.double() @ w.T
    digits = x.double().abs().amax(1, keepdim=True) / (127 * 508) * w.abs().sum(1)
    assert ((out.double() - ref).abs() <= ref.abs() * 2.0**-8 + digits * 1.01 + 1e-30).all()
    # and far closer than one int8 digit (per-token W8A8) could be: 127 levels per row
    one_digit = x.double().abs().amax(1, keepdim=True) / 254 * w.abs().sum(1)
    assert (out.double() - ref).abs().mean() < 0.05 * one_digit.mean()


@pytest.mark.parametrize(
    ("rows", "cols", "outs"), [(16, 576, 960), (32, 1536, 576), (33, 100, 7), (64, 64, 1)]
)
def test_matches_float64_reference(matmul: DigitsMatmul, rows: int, cols: int, outs: int) -> None:
    x, codes, scale = _problem(rows, cols, outs)
    out = matmul(x, matmul.pack(codes), scale)
    assert out.shape == (rows, outs) and out.dtype == torch.bfloat16
    _assert_close(out, x, codes, scale)


def test_row_chunks_change_no_output(matmul: DigitsMatmul, monkeypatch: pytest.MonkeyPatch) -> None:
    x, codes, scale = _problem(45, 576, 96)
    packed = matmul.pack(codes)
    whole = matmul(x, packed, scale)
    monkeypatch.setattr(int8_digits, "CHUNK_ROWS", 16)  # 16 + 16 + 13 rows
    assert torch.equal(matmul(x, packed, scale), whole)
    _assert_close(whole, x, codes, scale)


def test_outliers_zero_and_nan_rows(matmul: DigitsMatmul) -> None:
    x, codes, scale = _problem(16, 576, 64)
    packed = matmul.pack(codes)
    x[0, 17] = 1e3  # a massive activation: the row's other channels keep ~8 bits
    _assert_close(matmul(x, packed, scale), x, codes, scale)
    x[1] = 0
    assert (matmul(x, packed, scale)[1] == 0).all()
    x[2, 3] = float("nan")
    x[3, 5] = float("inf")
    out = matmul(x, packed, scale)
    assert out[2].isnan().all() and out[3].isnan().all()
    assert not out[[0, 1, *range(4, 16)]].isnan().any()


def test_int8_linear_uses_it_above_the_native_gemv_rows(matmul: DigitsMatmul) -> None:
    w = torch.randn(96, 576)
    layer = Int8Linear(*quantize_int8(w), None, torch.bfloat16)
    assert layer.digits is not None and "onednn_int8_digits" in layer.extra_repr()
    calls = []

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return matmul(*args)

    layer.digits = counting  # type: ignore[assignment]
    weight_l1 = float(layer.dequantized_weight().abs().sum(1).max())
    for rows in (2, 3, KERNEL_MAX_ROWS, 40):
        x = torch.randn(rows, 576).bfloat16()
        ref = torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
        atol = float(x.float().abs().max()) / 64516 * weight_l1  # the digits' rounding
        torch.testing.assert_close(layer(x), ref, rtol=2**-7, atol=atol)
    assert calls == [3, KERNEL_MAX_ROWS, 40]  # every row count above the native GEMV's
    assert Int8Linear(*quantize_int8(w), None, torch.float32).digits is None
    # The packed copy is counted in the weight memory the engine reports: twice the codes.
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert weight_bytes(layer) == params + 96 * 576


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINNACE_NATIVE_KERNELS", "0")
    assert int8_digits_matmul() is None
    layer = Int8Linear(*quantize_int8(torch.randn(32, 64)), None, torch.bfloat16)
    assert layer.digits is None and layer.packed is None
    x = torch.randn(KERNEL_MAX_ROWS, 64).bfloat16()  # the cast + bf16 GEMM path
    ref = x.float() @ layer.dequantized_weight().T
    torch.testing.assert_close(layer(x).float(), ref, rtol=2**-6, atol=2e-2)
