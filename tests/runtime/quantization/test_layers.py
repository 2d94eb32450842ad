"""The quantized layers against float references: int8 / FP8 / 4-bit matmuls (PyTorch's CPU
kernels and the dequantize paths), GGUF 4-bit blocks, tied embeddings, the FP8 KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from torch import nn

from pinnace.runtime.layers.attention.fp8_kv import (
    KV_FP8_SCALE,
    read_kv,
    resolve_kv_cache_dtype,
    write_kv,
)
from pinnace.runtime.layers.quantization.config import QuantizationConfig
from pinnace.runtime.layers.quantization.convert import quantize_linears
from pinnace.runtime.layers.quantization.embedding import QuantizedEmbedding
from pinnace.runtime.layers.quantization.fp8 import FP8_DTYPE, Fp8Linear, quantize_fp8
from pinnace.runtime.layers.quantization.gguf import gguf_blocks_to_int4
from pinnace.runtime.layers.quantization.int4 import Int4Linear, Int4Weight
from pinnace.runtime.layers.quantization.int8 import Int8Linear, quantize_int8
from pinnace.runtime.layers.quantization.parts import fp8_part

CPU = torch.device("cpu")


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values in a view that starts 2 bytes into its allocation."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 64 != 0
    return view


# ---------------------------------------------------------------------------------------------
# INT8
# ---------------------------------------------------------------------------------------------


def test_int8_codes_are_per_channel_round_to_nearest() -> None:
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [5, 40])  # the CPU kernel / cast + GEMM for many rows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_its_dequantized_weight(dtype: torch.dtype, rows: int) -> None:
    w, b = torch.randn(96, 128), torch.randn(96)
    codes, scale = quantize_int8(w)
    layer = Int8Linear(codes, scale, nn.Parameter(b.to(dtype), requires_grad=False), dtype)
    assert layer.use_kernel == (dtype == torch.bfloat16)
    x = torch.randn(rows, 128).to(dtype)
    expected = F.linear(x.float(), layer.dequantized_weight(), b)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel_err(layer(x), expected) < tolerance
    # The CPU kernel needs 64-byte aligned rows: an unaligned view is copied, not misread.
    torch.testing.assert_close(layer(_misaligned(x)), layer(x))
    assert layer(x.view(rows, 1, 128)).shape == (rows, 1, 96)


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------


def test_fp8_codes_keep_three_mantissa_bits() -> None:
    w = torch.randn(32, 64)
    codes, scale = quantize_fp8(w)
    assert codes.dtype == FP8_DTYPE
    deq = codes.float() * scale[:, None]
    normal = w.abs() > scale[:, None] * 2**-6  # outside e4m3's subnormal range
    assert ((deq - w).abs()[normal] <= w.abs()[normal] / 16 + 1e-7).all()


def test_fp8_linear_per_channel_and_block_scales() -> None:
    w = torch.randn(64, 96)
    codes, scale = quantize_fp8(w)
    layer = Fp8Linear(codes, scale, None)
    assert not layer.use_scaled_mm  # CPU: dequantize on the fly
    x = torch.randn(4, 96)
    assert _rel_err(layer(x), x @ layer.dequantized_weight().T) < 1e-5
    # A block-wise checkpoint: one scale per [32, 48] block.
    blocks = torch.rand(2, 2) + 0.5
    quant = QuantizationConfig("fp8", checkpoint=_fp8_ckpt((32, 48)))
    part = fp8_part(codes, blocks, quant, "layer")
    block_layer = Fp8Linear(part.codes, part.scale, None, part.block_size)
    expected = codes.float() * blocks.repeat_interleave(32, 0).repeat_interleave(48, 1)
    torch.testing.assert_close(block_layer.dequantized_weight(), expected)
    assert _rel_err(block_layer(x), x @ expected.T) < 1e-5
    with pytest.raises(ValueError, match="has a scale of shape"):
        fp8_part(codes, torch.ones(3, 3), quant, "layer")


def _fp8_ckpt(block: tuple[int, int] | None) -> object:
    from pinnace.runtime.layers.quantization.config import Fp8CheckpointConfig

    return Fp8CheckpointConfig(weight_block_size=block)


# ---------------------------------------------------------------------------------------------
# 4-bit
# ---------------------------------------------------------------------------------------------


def _int4_weight(rows: int, cols: int, group: int, perm: bool = False) -> Int4Weight:
    gen = torch.Generator().manual_seed(rows * cols + group)
    return Int4Weight(
        codes=torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8),
        scales=torch.rand(cols // group, rows, generator=gen) * 0.1 + 0.01,
        zeros=torch.randn(cols // group, rows, generator=gen) * 0.1,
        group_size=group,
        perm=torch.randperm(cols, generator=gen) if perm else None,
    )


@pytest.mark.parametrize(
    ("rows", "cols", "group", "perm", "kernel"),
    [
        (64, 128, 32, False, True),
        (64, 128, 64, True, True),  # act-order: activations gathered by perm
        (32, 96, 96, False, True),  # one group per row: the kernel runs it as 3 groups of 32
        (24, 64, 32, False, False),  # 24 rows: not the kernel's multiple of 16 -> dequantize
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_the_reference_dequantization(
    rows: int, cols: int, group: int, perm: bool, kernel: bool, dtype: torch.dtype
) -> None:
    weight = _int4_weight(rows, cols, group, perm)
    reference = weight.dequantize()
    layer = Int4Linear(weight, None, dtype, CPU)
    assert layer.use_kernel == kernel
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel_err(layer.dequantized_weight(), reference) < tolerance
    x = torch.randn(7, cols)
    assert _rel_err(layer(x.to(dtype)), x @ reference.T) < (
        1e-5 if dtype == torch.float32 else 2e-2
    )
    torch.testing.assert_close(layer(_misaligned(x.to(dtype))), layer(x.to(dtype)))


def test_int4_shards_concatenate_along_outputs() -> None:
    a, b = _int4_weight(32, 64, 32), _int4_weight(16, 64, 32)
    both = Int4Weight.concat([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match="act-order permutation"):
        Int4Weight.concat([a, _int4_weight(16, 64, 32, perm=True)])


# ---------------------------------------------------------------------------------------------
# GGUF 4-bit blocks -> Int4Weight, exactly what gguf's own dequantizer gives
# ---------------------------------------------------------------------------------------------


def _raw_blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    if qtype != Q.Q4_K:
        values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        return quantize(values, qtype)
    # No quantizer for K-quants in gguf-py: random codes and scales, finite f16 d / dmin.
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)
    blocks[:, 0:4] = np.array([0.01, 0.02], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_gguf_4bit_blocks_convert_exactly(qtype: Q) -> None:
    rows, cols = 32, 512
    raw = _raw_blocks(qtype, rows, cols)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(rows, cols))
    weight = gguf_blocks_to_int4(qtype.name, raw, cols)
    assert weight.group_size == 32
    torch.testing.assert_close(weight.dequantize(), expected, rtol=1e-6, atol=1e-6)
    layer = Int4Linear(weight, None, torch.float32, CPU)
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="need"):
        gguf_blocks_to_int4(qtype.name, raw[:, :-1], cols)


# ---------------------------------------------------------------------------------------------
# Quantizing a float model: a tied head and embedding share one copy of the codes
# ---------------------------------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 128)
        self.proj = nn.Linear(128, 128, bias=True)
        self.head = nn.Linear(128, 100, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_tied_embedding_and_head_share_codes(method: str) -> None:
    model = _Tied().to(torch.bfloat16)
    ids = torch.tensor([3, 7, 99])
    float_rows = model.embed(ids).detach().float()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert quantize_linears(model, method, CPU) == 3
    assert isinstance(model.embed, QuantizedEmbedding)
    assert model.head.weight is model.embed.weight
    assert model.head.weight_scale is model.embed.weight_scale
    quant_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert quant_bytes < 0.55 * float_bytes
    tolerance = 0.01 if method == "int8" else 0.07
    assert _rel_err(model.embed(ids), float_rows) < tolerance
    assert model.proj.bias is not None  # biases stay float


# ---------------------------------------------------------------------------------------------
# FP8 KV cache
# ---------------------------------------------------------------------------------------------


def test_fp8_kv_cache_round_trip_and_saturation() -> None:
    cache = torch.zeros(8, 2, 16, dtype=resolve_kv_cache_dtype("fp8", torch.bfloat16))
    values = torch.randn(3, 2, 16) * 4
    values[0, 0, 0] = 1e6  # far beyond the e4m3 range: saturates, never NaN
    write_kv(cache, torch.tensor([5, 1, 6]), values)
    back = read_kv(cache[torch.tensor([5, 1, 6])], torch.float32)
    assert back[0, 0, 0] == 448 * KV_FP8_SCALE
    finite = values.abs() < 448 * KV_FP8_SCALE
    assert ((back - values).abs()[finite] <= values.abs()[finite] / 16 + 2**-9).all()
    assert not read_kv(cache, torch.float32)[torch.tensor([0, 2, 3, 4, 7])].any()
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not one of"):
        resolve_kv_cache_dtype("int4", torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): FP8 tensor-core matmul, dequantizing paths of int8 / 4-bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fp8_int8_int4_layers_match_their_dequantized_weights() -> None:
    cuda = torch.device("cuda")
    w = torch.randn(256, 512, device=cuda)
    x = torch.randn(8, 512, device=cuda, dtype=torch.bfloat16)
    fp8 = Fp8Linear(*quantize_fp8(w), None)
    # Activations are quantized per token for the FP8 tensor-core path: a looser bound.
    assert _rel_err(fp8(x), x.float() @ fp8.dequantized_weight().T) < 0.05
    int8 = Int8Linear(*quantize_int8(w), None, torch.bfloat16)
    assert not int8.use_kernel
    assert _rel_err(int8(x), x.float() @ int8.dequantized_weight().T) < 0.02
    weight = _int4_weight(256, 512, 128, perm=True)
    int4 = Int4Linear(weight, None, torch.bfloat16, cuda)
    assert not int4.use_kernel
    assert _rel_err(int4(x), x.float() @ weight.dequantize().to(cuda).T) < 0.02
