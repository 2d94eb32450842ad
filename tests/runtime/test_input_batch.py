"""The persistent step inputs (worker/input_batch.py): fixed buffers, rows reused, padding."""

from __future__ import annotations

import pytest
import torch

from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.worker.input_batch import InputBatch

BS = 4
CPU = torch.device("cpu")


def _req(
    req_id: str,
    token_ids: list[int],
    computed: int,
    block_ids: list[int],
    spec: list[int] | None = None,
    **params: float,
) -> ScheduledRequest:
    return ScheduledRequest(
        req_id, token_ids, computed, block_ids, SamplingParams(**params), needs_sample=True,
        spec_token_ids=spec or [],
    )  # fmt: skip


def _expected(scheduled: list[ScheduledRequest]) -> tuple[list[int], list[int], list[int]]:
    """ids, positions, slots as the list-building runner computed them."""
    ids, positions, slots = [], [], []
    for s in scheduled:
        pos = range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens)
        ids += s.token_ids
        positions += pos
        slots += [s.block_ids[p // BS] * BS + p % BS for p in pos]
    return ids, positions, slots


def _addresses(batch: InputBatch) -> list[int]:
    tensors = [batch.input_ids, batch.positions, batch.slot_mapping, batch.query_start_loc]
    tensors += [batch.seq_lens, batch.step_block_table, *batch.sampling.step.values()]
    return [t.data_ptr() for t in tensors]


def _check(batch: InputBatch, scheduled: list[ScheduledRequest]) -> None:
    step = batch.prepare(scheduled)
    ids, positions, slots = _expected(scheduled)
    assert step.input_ids.tolist() == ids
    assert step.positions.tolist() == positions
    assert step.layout.slot_mapping.tolist() == slots
    seq_lens = [s.num_computed_tokens + s.num_scheduled_tokens for s in scheduled]
    assert step.layout.seq_lens_tensor is not None and step.layout.block_table is not None
    assert step.layout.seq_lens_tensor.tolist() == seq_lens
    for b, s in enumerate(scheduled):
        n = -(-seq_lens[b] // BS)
        assert step.layout.block_table[b, :n].tolist() == s.block_ids[:n]


def test_steps_write_in_place_and_finished_rows_are_reused() -> None:
    batch = InputBatch(4, 32, 8, BS, CPU)
    addresses = _addresses(batch)
    a = _req("a", list(range(10, 16)), 0, [7, 2], temperature=0.5, top_k=3)
    b = _req("b", [20, 21, 22], 0, [5])
    _check(batch, [a, b])  # prefill
    assert batch.req_rows == {"a": 0, "b": 1}
    assert batch.sampling.step["temperature"][:2].tolist() == [0.5, 1.0]
    assert batch.sampling.step["top_k"][:2].tolist() == [3, 0]
    a2 = _req("a", [16], 6, [7, 2], temperature=0.5, top_k=3)
    b2 = _req("b", [23, 24], 3, [5, 9], spec=[24])  # one known token + one proposed (spec decoding)
    _check(batch, [b2, a2])  # scheduler order, not row order
    step = batch.prepare([b2, a2])
    assert step.sample_idx == [0, 1, 2]  # b: last known + proposal rows; a: its one row
    assert batch.sampling.step["temperature"][:2].tolist() == [1.0, 0.5]
    batch.remove({"a"})
    c = _req("c", [30, 31], 0, [3], temperature=0.7)
    _check(batch, [_req("b", [25], 5, [5, 9]), c])
    assert batch.req_rows == {"b": 1, "c": 0}  # c took a's row
    assert batch.sampling.step["temperature"][:2].tolist() == pytest.approx([1.0, 0.7])
    assert batch.sampling.step["top_k"][:2].tolist() == [0, 0]  # a's top_k did not leak
    assert _addresses(batch) == addresses


def test_changed_block_ids_rewrite_the_row() -> None:
    """A sliding window releases early blocks: their ids change, not just the tail."""
    batch = InputBatch(2, 16, 8, BS, CPU)
    _check(batch, [_req("a", list(range(8)), 0, [1, 2])])
    _check(batch, [_req("a", [9], 8, [0, 2, 6])])  # block 1 released (placeholder 0)


def test_decode_step_padded_to_a_bucket() -> None:
    """Padded requests write only the pad slot, read only the pad block, and are never
    sampled; a step with a prefill chunk cannot be padded."""
    pad_block = 15
    batch = InputBatch(8, 32, 8, BS, CPU, pad_slot=pad_block * BS)
    real = [_req("a", [5], 6, [7, 2]), _req("b", [6], 2, [4])]
    step = batch.prepare(real, num_padded=8)
    assert step.input_ids.shape == (8,) and (step.num_reqs, step.num_padded_reqs) == (2, 8)
    slots = step.layout.slot_mapping.tolist()
    assert slots[:2] == [2 * BS + 2, 4 * BS + 2]
    assert slots[2:] == [pad_block * BS] * 6
    assert step.sample_idx == [0, 1]
    assert step.layout.query_start_loc is not None and step.layout.seq_lens_tensor is not None
    assert step.layout.query_start_loc.tolist() == list(range(9))
    assert step.layout.seq_lens_tensor.tolist() == [7, 3] + [1] * 6
    assert step.layout.block_table is not None
    assert step.layout.block_table[2:, 0].tolist() == [pad_block] * 6
    assert step.positions[2:].tolist() == [0] * 6
    assert batch.sampling.step["temperature"][2:8].tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="decode step"):
        batch.prepare([_req("c", [1, 2], 0, [3])], num_padded=4)


def test_overflow_is_an_error_not_a_write_past_the_buffer() -> None:
    batch = InputBatch(2, 8, 2, BS, CPU)
    with pytest.raises(ValueError, match="exceeds"):
        batch.prepare([_req("a", list(range(9)), 0, [1, 2])])
    with pytest.raises(ValueError, match="blocks"):
        batch.prepare([_req("a", [1], 8, [1, 2, 3])])
