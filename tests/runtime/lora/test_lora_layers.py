"""LoRALinear's batched path (all slots in two bmm calls over padded segments) against its
per-slot loop, and slots reloaded with a smaller rank leaving no stale rows behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pinnace.runtime.lora import context
from pinnace.runtime.lora.context import LoRABatch, lora_batch_context
from pinnace.runtime.lora.layers import LoRALinear
from pinnace.runtime.lora.targets import TargetModule

IN, OUT, RANK, SLOTS = 64, 96, 8, 4


def _layer(seed: int) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=False)
    target = TargetModule("self_attn.o_proj", ("o_proj",), IN, (OUT,))
    layer = LoRALinear(base, target, SLOTS, RANK, torch.float32, torch.device("cpu"))
    for slot, k in enumerate((8, 3, 0, 5)):
        weights = (torch.randn(k, IN, generator=g), torch.randn(k, OUT, generator=g))
        layer.set_slot(slot, weights if k else None)
    return layer


@pytest.mark.parametrize(
    ("segments", "base_rows"),
    [
        ([(0, 2, 5), (3, 5, 9), (1, 9, 11)], [0, 1, 11]),  # uneven slices, base rows around
        ([(1, 0, 4), (2, 4, 8)], [4, 5, 6, 7, 8, 9, 10, 11]),  # slot 2 targets nothing here
    ],
)
def test_batched_equals_the_per_slot_loop(
    segments: list[tuple[int, int, int]], base_rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = _layer(0)
    x = torch.randn(12, IN)
    batch = LoRABatch(segments)
    assert batch.padded(12, x.device) is not None
    with torch.no_grad():
        with lora_batch_context(batch):
            batched = layer(x)
        monkeypatch.setattr(context, "MAX_PADDING_FACTOR", 0)  # forces the loop
        with lora_batch_context(LoRABatch(segments)):
            looped = layer(x)
        base = layer.base(x)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.equal(batched, base)
    torch.testing.assert_close(batched[base_rows], base[base_rows])


def test_too_much_padding_keeps_the_loop() -> None:
    # A 40-row prefill next to two 1-row decodes would pad to 120 rows for 42 used.
    segments = [(0, 0, 40), (1, 40, 41), (2, 41, 42)]
    assert LoRABatch(segments).padded(42, torch.device("cpu")) is None
    assert LoRABatch([(0, 0, 4)]).padded(4, torch.device("cpu")) is None


def test_smaller_adapter_in_a_slot_leaves_no_stale_rows() -> None:
    layer = _layer(1)
    layer.set_slot(0, (torch.ones(2, IN), torch.ones(2, OUT)))
    assert layer.slot_k[0] == 2
    assert not layer.lora_a[0, 2:].any()
    layer.set_slot(3, None)
    assert not layer.lora_a[3].any()
