"""The step's LoRA batch: which token rows run with which device slot.

Set by the model runner around one forward (like forward_context), read by every
LoRALinear; outside it, or for a step without adapters, the layers are the base model.
The runner orders the step's requests by slot, so each slot's rows are one contiguous
slice of the flat batch (no gather or scatter):

    rows:   [ base ... | slot 2 ........ | slot 0 ... ]
    segments:           (2, start, end)   (0, start, end)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class LoRABatch:
    """`segments`: (slot, start, end) for each slot in use; rows [start, end) use it."""

    segments: list[tuple[int, int, int]]


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
