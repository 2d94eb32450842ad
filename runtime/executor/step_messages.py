"""The per-step message the driver broadcasts to the other ranks (vLLM v1's split of the
scheduler output into NewRequestData and CachedRequestData).

A SchedulerOutput holds, per scheduled request, its whole prompt, its output so far, its
sampling parameters and its whole block table: pickled every step, that grows with
batch x context. The other ranks never sample, and what they need of a request beyond
this step's tokens does not change while it runs, so they keep it:

    first scheduled (or again after a preemption)   NewRequestData: prompt token ids,
                                                     sampling parameters, adapter
    every step it is scheduled                      CachedRequestData: this step's tokens,
                                                     num_computed_tokens, the block
                                                     table's changes, flags

Both sides apply a step's finished and preempted ids before its requests (as the model
runner does), so the driver's StepEncoder knows exactly what the workers' StepDecoder
holds; a request preempted and resumed is new again (its recompute starts from its
prompt). The decoder rebuilds the SchedulerOutput the runner executes, so every rank
runs the same runner code. What it does not rebuild, because only the driver reads it
(the sampler, proposals): output_token_ids (left empty on the workers).

Block tables change by appending (a new block every block_size tokens) and, under a
sliding window, by blocks outside it turning into RELEASED_BLOCK_ID: a step sends the
appended ids and the (index, id) pairs that changed, never the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pinnace.runtime.core.outputs import ScheduledRequest, SchedulerOutput
from pinnace.runtime.sampling_params import SamplingParams


class NewRequestData(NamedTuple):
    """What the workers keep of a request while it runs (sent once per admission)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_id: int


class CachedRequestData(NamedTuple):
    """One scheduled request's share of a step (its size does not grow with context)."""

    req_id: str
    token_ids: list[int]  # this step's tokens, proposed ones last
    num_computed_tokens: int
    num_kept_blocks: int  # the known table's length kept (shorter only if it shrank)
    changed_blocks: list[tuple[int, int]]  # (index, block id) below num_kept_blocks
    new_block_ids: list[int]  # appended after the kept ones
    needs_sample: bool
    num_output_tokens: int
    num_prompt_logprobs: int | None
    num_spec_tokens: int  # the last num_spec_tokens of token_ids are proposals


class StepMessage(NamedTuple):
    new: list[NewRequestData]
    scheduled: list[CachedRequestData]  # in the scheduler's order
    finished_req_ids: set[str]
    preempted_req_ids: set[str]


def _apply_blocks(
    table: list[int], kept: int, changed: list[tuple[int, int]], new: list[int]
) -> None:
    del table[kept:]
    for i, block_id in changed:
        table[i] = block_id
    table.extend(new)


def _block_delta(known: list[int], ids: list[int]) -> tuple[int, list[tuple[int, int]], list[int]]:
    kept = min(len(known), len(ids))
    if ids[:kept] == known[:kept]:
        return kept, [], ids[kept:]
    changed = [(i, b) for i, (a, b) in enumerate(zip(known[:kept], ids, strict=False)) if a != b]
    return kept, changed, ids[kept:]


@dataclass
class StepEncoder:
    """The driver's side: per running request, the block table the workers hold."""

    tables: dict[str, list[int]] = field(default_factory=dict)

    def encode(self, sched: SchedulerOutput) -> StepMessage:
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.tables.pop(req_id, None)
        new: list[NewRequestData] = []
        steps: list[CachedRequestData] = []
        for s in sched.scheduled:
            table = self.tables.get(s.req_id)
            if table is None:
                table = self.tables[s.req_id] = []
                new.append(
                    NewRequestData(s.req_id, s.prompt_token_ids, s.sampling_params, s.lora_id)
                )
            kept, changed, appended = _block_delta(table, s.block_ids)
            if changed or appended or kept < len(table):
                _apply_blocks(table, kept, changed, appended)
            step = CachedRequestData(
                s.req_id, s.token_ids, s.num_computed_tokens, kept, changed, appended,
                s.needs_sample, s.num_output_tokens, s.num_prompt_logprobs,
                len(s.spec_token_ids),
            )  # fmt: skip
            steps.append(step)
        return StepMessage(new, steps, sched.finished_req_ids, sched.preempted_req_ids)


@dataclass
class _Kept:
    new: NewRequestData
    block_ids: list[int]


@dataclass
class StepDecoder:
    """A worker's side: the running requests' data; rebuilds each step's SchedulerOutput."""

    requests: dict[str, _Kept] = field(default_factory=dict)

    def decode(self, msg: StepMessage) -> SchedulerOutput:
        for req_id in msg.finished_req_ids | msg.preempted_req_ids:
            self.requests.pop(req_id, None)
        for data in msg.new:
            self.requests[data.req_id] = _Kept(data, [])
        scheduled: list[ScheduledRequest] = []
        for c in msg.scheduled:
            kept = self.requests[c.req_id]
            _apply_blocks(kept.block_ids, c.num_kept_blocks, c.changed_blocks, c.new_block_ids)
            tokens = c.token_ids
            scheduled.append(
                ScheduledRequest(
                    req_id=c.req_id,
                    token_ids=tokens,
                    num_computed_tokens=c.num_computed_tokens,
                    # A copy: the runner may keep a step's table (the driver's is fresh).
                    block_ids=list(kept.block_ids),
                    sampling_params=kept.new.sampling_params,
                    needs_sample=c.needs_sample,
                    num_output_tokens=c.num_output_tokens,
                    prompt_token_ids=kept.new.prompt_token_ids,
                    lora_id=kept.new.lora_id,
                    num_prompt_logprobs=c.num_prompt_logprobs,
                    spec_token_ids=tokens[len(tokens) - c.num_spec_tokens :],
                )
            )
        return SchedulerOutput(scheduled, msg.finished_req_ids, msg.preempted_req_ids)
