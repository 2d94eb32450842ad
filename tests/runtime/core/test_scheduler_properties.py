"""Randomized workloads: limits hold in every step, nothing leaks, nobody is lost.

Arrival steps, prompt lengths (drawn from a few shared prefixes so the prefix cache is
hit), budgets, sequence caps, block counts, block sizes and aborts are all drawn by
hypothesis; the harness checks budget, max_num_seqs, token accounting, ref counts and
the KV content of every position each request reads in every step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKENS = st.integers(1, 4)  # a tiny alphabet: prompts and outputs often share blocks


@dataclass
class Arrival:
    req_id: str
    step: int
    prompt: list[int]
    max_tokens: int
    abort_step: int | None


@dataclass
class Workload:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_caching: bool
    arrivals: list[Arrival]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    num_blocks = draw(st.integers(2, 12))
    capacity = block_size * num_blocks
    prefixes = draw(st.lists(st.lists(TOKENS, min_size=1, max_size=24), min_size=1, max_size=3))
    arrivals = []
    for i in range(draw(st.integers(1, 10))):
        max_tokens = draw(st.integers(1, min(12, capacity - 1)))
        prefix = draw(st.sampled_from(prefixes))
        prompt = prefix[: draw(st.integers(0, len(prefix)))] + draw(st.lists(TOKENS, max_size=16))
        prompt = prompt[: capacity - max_tokens] or [1]
        arrivals.append(
            Arrival(
                req_id=f"r{i}",
                step=draw(st.integers(0, 12)),
                prompt=prompt,
                max_tokens=max_tokens,
                abort_step=draw(st.none() | st.integers(0, 30)),
            )
        )
    arrivals.sort(key=lambda a: a.step)  # stable: ties keep their order
    return Workload(
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        enable_caching=draw(st.booleans()),
        arrivals=arrivals,
    )


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    # make_harness is a stateless factory, safe to share across examples.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(workload=workloads(), seed=st.integers(0, 2**16))
def test_random_workloads_respect_limits_and_release_everything(make_harness, workload, seed):
    rng = random.Random(seed)
    h = make_harness(
        num_blocks=workload.num_blocks,
        block_size=workload.block_size,
        max_num_seqs=workload.max_num_seqs,
        max_num_batched_tokens=workload.max_num_batched_tokens,
        enable_caching=workload.enable_caching,
        sample=lambda request: rng.randint(1, 4),
    )
    pending = list(workload.arrivals)
    aborted: set[str] = set()
    step = 0
    while pending or h.scheduler.has_unfinished_requests():
        while pending and pending[0].step <= step:
            a = pending.pop(0)
            h.add(a.req_id, a.prompt, max_tokens=a.max_tokens)
        for a in workload.arrivals:
            if a.abort_step == step and a.req_id in h.scheduler.requests:
                h.abort(a.req_id)
                aborted.add(a.req_id)
        h.step()
        step += 1
        assert step < 2_000, "the scheduler stopped making progress"

    h.assert_no_leaks()
    for a in workload.arrivals:
        request = h.all_requests[a.req_id]
        assert request.prompt_token_ids == a.prompt
        assert h.emitted[a.req_id] == request.output_token_ids
        if a.req_id not in aborted:
            assert h.finish_reasons[a.req_id] == "length"
            assert len(request.output_token_ids) == a.max_tokens
    # FCFS: requests are first admitted in arrival order.
    added = [a.req_id for a in workload.arrivals]
    assert h.first_admitted == [r for r in added if r in h.first_admitted]
