"""The native bf16 RMSNorm (runtime/kernels/rms_norm.c) gives HF's arithmetic: the same
values as the eight-op torch formula, on every row shape the models use."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pinnace.runtime.kernels.rms_norm import REQUIRED_CPU_FLAGS, Norm, rms_norm
from pinnace.runtime.layers.norm import RMSNorm

pytestmark = pytest.mark.usefixtures("fresh_kernels")


@pytest.fixture
def native(native_kernel: Callable[..., Norm]) -> Norm:
    return native_kernel(rms_norm, REQUIRED_CPU_FLAGS)


def _layer(hidden: int, seed: int) -> RMSNorm:
    layer = RMSNorm(hidden, 1e-5).bfloat16()
    layer.weight.data = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    layer.weight.data = layer.weight.data.bfloat16()
    return layer


@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (7, 100), (300, 2048), (5, 64)])
def test_equals_the_torch_formula(native: Norm, rows: int, hidden: int) -> None:
    layer = _layer(hidden, rows)
    assert layer.native is native
    x = (torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    out = layer(x)
    layer.native = None
    ref = layer(x)
    # Float32 sums in another order may move a value across a bf16 rounding boundary (seen:
    # 3 of 614400 values), and the weight multiply rounds again: at most 2 bf16 ulps.
    assert (out == ref).double().mean() >= 0.999
    torch.testing.assert_close(out, ref, rtol=2**-6, atol=0)


def test_nan_rows_stay_nan_and_views_take_the_torch_path(native: Norm) -> None:
    layer = _layer(64, 0)
    x = torch.randn(3, 64).bfloat16()
    x[1, 5] = float("nan")
    out = layer(x)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    calls = []
    layer.native = lambda *a: calls.append(1) or native(*a)
    wide = torch.randn(2, 128).bfloat16()
    layer(wide[:, :64])  # a non-contiguous view: not handed to the kernel
    layer(x.float())  # float32: HF parity runs stay on torch's ops
    assert calls == []
