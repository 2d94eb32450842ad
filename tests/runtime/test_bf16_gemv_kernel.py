"""The native bf16 GEMV (runtime/kernels/bf16_gemv.c): against a float64 reference (AMX
and AVX-512 paths), NaN and zero rows, used by PackedLinear for decode rows only, and
optional (PINNACE_NATIVE_KERNELS=0 leaves oneDNN's path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pinnace.runtime.kernels.bf16_gemv import (
    AMX_MAX_ROWS,
    MAX_ROWS,
    REQUIRED_CPU_FLAGS,
    Gemv,
    bf16_gemv,
    max_rows,
    read_bandwidth,
    use_amx,
)
from pinnace.runtime.layers.linear import PackedLinear, can_pack, pack_linears, weight_bytes

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture
def gemv(native_kernel: Callable[..., Gemv]) -> Gemv:
    return native_kernel(bf16_gemv, REQUIRED_CPU_FLAGS)


@pytest.fixture(params=["amx", "avx512"])
def path(request: pytest.FixtureRequest, gemv: Gemv) -> Iterator[str]:
    """The kernel with AMX allowed (where the CPU has it: 2-64 rows, K % 32 == 0) or not."""
    use_amx(request.param == "amx")
    yield request.param
    use_amx(True)


def _problem(rows: int, cols: int, outs: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).bfloat16()
    w = (torch.randn(outs, cols, generator=g) * 0.05).bfloat16()
    bias = torch.randn(outs, generator=g).bfloat16()
    return x, w, bias


def _assert_close_to_float64(
    out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Within 1 bf16 ulp (the final rounding) plus float32 summation error (2^-22 of
    sum |x w|) of the float64 result, and equal to its bf16 rounding almost everywhere."""
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    budget = ref.abs() * 2.0**-8 + (x.double().abs() @ w.double().abs().T) * 2.0**-22
    assert ((out.double() - ref).abs() <= budget).all()
    assert (out == ref.to(torch.bfloat16)).double().mean() >= 0.97


@pytest.mark.parametrize(
    ("rows", "cols", "outs"),
    [(1, 576, 960), (2, 1536, 576), (3, 100, 7), (4, 64, 1), (5, 576, 33), (8, 1000, 18),
     (7, 32, 4), (1, 8192, 9), (6, 1536, 577), (8, 576, 960), (5, 40, 3), (12, 100, 10),
     (3, 8192, 40), (17, 576, 960), (24, 1536, 577), (32, 576, 70), (32, 100, 20),
     (20, 1000, 33), (17, 64, 9), (20, 64, 48), (33, 576, 70), (48, 1536, 577),
     (40, 576, 48), (64, 64, 48), (57, 100, 20)],
)  # fmt: skip
def test_matches_float64_reference(gemv: Gemv, path: str, rows: int, cols: int, outs: int) -> None:
    x, w, bias = _problem(rows, cols, outs)
    for b in (bias, None):
        out = gemv(x, w, b)
        assert out.shape == (rows, outs) and out.dtype == torch.bfloat16
        _assert_close_to_float64(out, x, w, b)


@pytest.mark.parametrize("rows", [3, 6, 17, 32, 47, 64])
def test_zero_and_nan_rows(gemv: Gemv, path: str, rows: int) -> None:
    x, w, _ = _problem(rows, 576, 70)  # 70: 4 AMX tiles of 16 weight rows and 6 rows more
    x[1] = x[rows - 2] = 0
    x[2, 5] = x[rows - 1, 7] = float("nan")  # past 16 (32) rows: also in the last B tile
    out = gemv(x, w, None)
    assert (out[1] == 0).all() and (out[rows - 2] == 0).all() and not out[0].isnan().any()
    assert out[2].isnan().all() and out[rows - 1].isnan().all()


@pytest.mark.parametrize("rows", [1, 4, 8, 24, 56])
def test_threads_give_the_same_result(gemv: Gemv, rows: int) -> None:
    x, w, bias = _problem(rows, 576, 1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv(x, w, bias)
        torch.set_num_threads(2)
        assert torch.equal(gemv(x, w, bias), one)  # rows split, never a sum
    finally:
        torch.set_num_threads(before)


def test_packed_linear_uses_it_for_decode_rows_only(gemv: Gemv, path: str) -> None:
    """Up to max_rows(): 64 rows with AMX tiles (where the CPU has them), 8 without."""
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("CPU without oneDNN bf16")  # implies no AVX-512 BF16 either
    linear = nn.Linear(576, 96, bias=True).bfloat16()
    layer = PackedLinear(linear)
    assert layer.gemv is not None and "native_bf16_gemv" in layer.extra_repr()
    calls: list[int] = []
    native = layer.gemv

    def counting(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return native(x, *rest)  # type: ignore[arg-type]

    layer.gemv = counting
    most = max_rows()
    assert most == (AMX_MAX_ROWS if use_amx(path == "amx") else MAX_ROWS)  # as set
    row_counts = (1, 3, MAX_ROWS, MAX_ROWS + 1, most, most + 1)
    for rows in row_counts:
        x = torch.randn(rows, 576).bfloat16()
        ref = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(layer(x), ref, rtol=2**-7, atol=1e-2)
    assert calls == [rows for rows in row_counts if rows <= most]


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINNACE_NATIVE_KERNELS", "0")
    assert bf16_gemv() is None and read_bandwidth(1 << 20) is None
    if can_pack(torch.device("cpu"), torch.bfloat16):
        layer = PackedLinear(nn.Linear(64, 32).bfloat16())
        assert layer.gemv is None and layer.plain is None and "native" not in layer.extra_repr()
        assert layer(torch.randn(1, 64).bfloat16()).shape == (1, 32)


def test_read_bandwidth_probe(gemv: Gemv) -> None:
    bandwidth = read_bandwidth(8 << 20, repeats=2)
    assert bandwidth is not None and bandwidth > 1e8  # bytes/s; any real machine


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_weight_bytes_count_the_plain_copy(gemv: Gemv) -> None:
    """Layers with the GEMV hold their weight twice (packed and plain), except a tied
    lm_head's plain weight, which is the embedding's; the logged weight bytes say so."""
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("CPU without oneDNN bf16")  # implies no AVX-512 BF16 either
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16)).bfloat16()
    assert pack_linears(model) == 2
    assert weight_bytes(model) == _param_bytes(model) + (64 * 32 + 32 * 16) * 2
    tied = nn.ModuleDict({"embed": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False)})
    tied["head"].weight = tied["embed"].weight
    tied = tied.bfloat16()
    pack_linears(tied)
    assert tied["head"].plain is not None  # type: ignore[union-attr]
    assert weight_bytes(tied) == _param_bytes(tied)  # embedding + packed head only


def test_weight_bytes_without_the_gemv_are_the_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PINNACE_NATIVE_KERNELS", "0")
    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("CPU without oneDNN bf16")
    model = nn.Sequential(nn.Linear(64, 32)).bfloat16()
    pack_linears(model)
    assert weight_bytes(model) == _param_bytes(model)
