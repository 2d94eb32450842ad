"""The step's LoRA batch: which token rows run with which device slot.

Set by the model runner around one forward (like forward_context), read by every
LoRALinear; outside it, or for a step without adapters, the layers are the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Per-token adapter slots of one step, grouped by slot.

    `token_slots[t]` is token row t's slot (-1: the base model). `groups` lists each slot
    in use with its rows as an index tensor, or None when the slot has every row (one
    adapter for the whole step: no gather / scatter needed).
    """

    token_slots: list[int]
    groups: list[tuple[int, torch.Tensor | None]]

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device) -> LoRABatch | None:
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(token_slots):
            if slot >= 0:
                rows.setdefault(slot, []).append(row)
        if not rows:
            return None
        groups: list[tuple[int, torch.Tensor | None]] = [
            (slot, None if len(r) == len(token_slots) else torch.tensor(r, device=device))
            for slot, r in rows.items()
        ]
        return cls(token_slots, groups)


_BATCH: ContextVar[LoRABatch | None] = ContextVar("pinnace_lora_batch", default=None)


@contextlib.contextmanager
def lora_batch_context(batch: LoRABatch | None) -> Iterator[None]:
    token = _BATCH.set(batch)
    try:
        yield
    finally:
        _BATCH.reset(token)


def current_lora_batch() -> LoRABatch | None:
    return _BATCH.get()
