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
from dataclasses import dataclass, field

import torch

# Batched LoRA pads every slot's rows to the longest segment; beyond this much padding
# (e.g. one long prefill next to short decodes) the per-segment loop does less work.
MAX_PADDING_FACTOR = 2


@dataclass
class PaddedSegments:
    """The segments as a [S, length] grid of rows, for one bmm over all slots at once."""

    slots: torch.Tensor  # [S] device slot of each segment
    gather: torch.Tensor  # [S * length] input row per grid cell; padding -> num_rows (a zero row)
    scatter: torch.Tensor  # [S * length] output row per grid cell; padding -> 0 (adds zero)
    length: int


@dataclass
class LoRABatch:
    """`segments`: (slot, start, end) for each slot in use; rows [start, end) use it."""

    segments: list[tuple[int, int, int]]
    _padded: dict[int, PaddedSegments | None] = field(default_factory=dict, repr=False)

    def padded(self, num_rows: int, device: torch.device) -> PaddedSegments | None:
        """The grid for a [num_rows, ...] input, built once per step; None when padding
        would more than double the rows."""
        if num_rows not in self._padded:
            self._padded[num_rows] = _pad(self.segments, num_rows, device)
        return self._padded[num_rows]


def _pad(
    segments: list[tuple[int, int, int]], num_rows: int, device: torch.device
) -> PaddedSegments | None:
    if len(segments) < 2:
        return None  # one slice: the loop is already a single pair of matmuls
    length = max(end - start for _, start, end in segments)
    used = sum(end - start for _, start, end in segments)
    if len(segments) * length > MAX_PADDING_FACTOR * used:
        return None
    gather = torch.full((len(segments), length), num_rows, dtype=torch.long)
    scatter = torch.zeros((len(segments), length), dtype=torch.long)
    for i, (_, start, end) in enumerate(segments):
        gather[i, : end - start] = torch.arange(start, end)
        scatter[i, : end - start] = torch.arange(start, end)
    slots = torch.tensor([slot for slot, _, _ in segments], dtype=torch.long)
    return PaddedSegments(
        slots.to(device), gather.view(-1).to(device), scatter.view(-1).to(device), length
    )


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
