"""The driver's step deltas (executor/step_messages.py) rebuild every step's requests on a
worker: joins, growing block tables, blocks released outside a sliding window, chunks,
proposals, preemption and resumption, a finished id reused in the same step."""

from __future__ import annotations

import dataclasses
from typing import Any

from pinnace.runtime.core.outputs import ScheduledRequest, SchedulerOutput
from pinnace.runtime.executor.step_messages import StepDecoder, StepEncoder
from pinnace.runtime.sampling_params import SamplingParams

PROMPT = list(range(100, 120))


def _req(
    req_id: str, tokens: list[int], computed: int, blocks: list[int], **kw: Any
) -> ScheduledRequest:
    fields: dict[str, Any] = dict(
        req_id=req_id, token_ids=tokens, num_computed_tokens=computed, block_ids=blocks,
        sampling_params=SamplingParams(temperature=0.5, seed=len(req_id)), needs_sample=True,
        prompt_token_ids=PROMPT, output_token_ids=[7, 8], num_output_tokens=2, lora_id=ord(req_id),
    )  # fmt: skip
    return ScheduledRequest(**(fields | kw))


STEPS = [
    SchedulerOutput([_req("a", PROMPT[:8], 0, [3], needs_sample=False, num_prompt_logprobs=1)]),
    SchedulerOutput([_req("a", PROMPT[8:], 8, [3, 4, 9]), _req("b", PROMPT, 0, [5, 6, 7])]),
    SchedulerOutput(
        [
            _req("a", [7, 1, 2], 20, [3, 4, 9, 11], spec_token_ids=[1, 2]),
            _req("b", [8], 20, [5, 6, 7]),
        ]
    ),
    # A sliding window released a's first block; b was preempted.
    SchedulerOutput([_req("a", [9], 22, [-1, 4, 9, 11])], preempted_req_ids={"b"}),
    # b resumes (recomputes prompt and output); a finished and its id comes back at once.
    SchedulerOutput(
        [_req("b", [*PROMPT, 8], 0, [1, 2, 5]), _req("a", PROMPT[:4], 0, [6])],
        finished_req_ids={"a"},
    ),
]


def test_a_worker_rebuilds_every_step_but_the_output_history() -> None:
    encoder, decoder = StepEncoder(), StepDecoder()
    new_ids = []
    for sched in STEPS:
        msg = encoder.encode(sched)
        new_ids.append([d.req_id for d in msg.new])
        got = decoder.decode(msg)
        want = [dataclasses.replace(s, output_token_ids=[]) for s in sched.scheduled]
        assert got.scheduled == want
        assert (got.finished_req_ids, got.preempted_req_ids) == (
            sched.finished_req_ids, sched.preempted_req_ids)  # fmt: skip
    assert new_ids == [["a"], ["b"], [], [], ["b", "a"]]
    # Only the changes travel: the window's release is one pair, no table resent.
    step = encoder.encode(SchedulerOutput([_req("b", [4], 21, [1, 2, 5])]))
    assert step.new == [] and step.scheduled[0].new_block_ids == []
    encoder = StepEncoder()
    for sched in STEPS[:3]:
        encoder.encode(sched)
    msg = encoder.encode(STEPS[3])
    assert msg.scheduled[0].changed_blocks == [(0, -1)] and msg.scheduled[0].new_block_ids == []
