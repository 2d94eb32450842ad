"""INT8 W8A8 for CUDA (layers/quantization/int8_cuda.py): dispatch and math on CPU
(torch._int_mm runs on CPU too); tests/gpu runs it on the device."""

from __future__ import annotations

import pytest
import torch

from pinnace.runtime.layers.quantization import int8 as int8_module
from pinnace.runtime.layers.quantization.int8 import Int8Linear, quantize_int8
from pinnace.runtime.layers.quantization.int8_cuda import int8_matmul, int_mm_eligible

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_int_mm_only_for_prefill_sized_cuda_steps() -> None:
    assert int_mm_eligible(17, 64, 128, CUDA)
    assert not int_mm_eligible(16, 64, 128, CUDA)  # decode-sized: dequantize
    assert not int_mm_eligible(64, 60, 128, CUDA)  # K not a multiple of 8
    assert not int_mm_eligible(64, 64, 100, CUDA)  # N not a multiple of 8
    assert not int_mm_eligible(64, 64, 128, CPU)


def test_w8a8_matmul_close_to_the_dequantized_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 256, generator=g), torch.randn(40, 256, generator=g)
    codes, scale = quantize_int8(w)
    out = int8_matmul(x.bfloat16(), codes, scale)
    ref = x @ (codes.float() * scale[:, None]).t()
    assert out.dtype == torch.bfloat16
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.02  # activation rounding shows, within 2 % of the largest output


def test_a_gpu_without_int8_gemm_falls_back_to_dequantizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codes, scale = quantize_int8(torch.randn(32, 64))
    layer = Int8Linear(codes, scale, None, torch.float32)
    x = torch.randn(20, 64)
    expected = layer(x)  # CPU float32: the dequantize path
    assert not layer.use_int_mm

    def unsupported(*args: object) -> torch.Tensor:
        raise RuntimeError("_int_mm: not supported on this device")

    layer.use_int_mm = True
    monkeypatch.setattr(int8_module, "int_mm_eligible", lambda *a: True)
    monkeypatch.setattr(int8_module, "int8_matmul", unsupported)
    torch.testing.assert_close(layer(x), expected)
    assert not layer.use_int_mm  # given up once, for good
