"""Scheduling of prompt_logprobs requests (no torch): every prompt row is computed (no
prefix-cache hit), chunks say which rows owe logprobs, the entries arrive once, in order,
with the first sampled token, also when the request is preempted mid-prefill."""

from __future__ import annotations

from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import ModelRunnerOutput, RequestUpdate, SchedulerOutput
from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.request import Request
from pinnace.runtime.sampling_params import SamplingParams


def entry(prompt: list[int], position: int) -> dict[int, float]:
    """What the fake model scores at a prompt row: the next prompt token, keyed by position."""
    return {prompt[position + 1]: -float(position)}


def execute(sched: SchedulerOutput, requests: dict[str, Request]) -> ModelRunnerOutput:
    """A fake runner: prompt rows owing logprobs get `entry`, sampled rows get token 7."""
    out = ModelRunnerOutput()
    for item in sched.scheduled:
        prompt = requests[item.req_id].prompt_token_ids
        if item.num_prompt_logprobs is not None:
            start = item.num_computed_tokens
            end = min(start + item.num_scheduled_tokens, len(prompt) - 1)
            out.prompt_logprobs[item.req_id] = [entry(prompt, p) for p in range(start, end)]
        if item.needs_sample:
            out.sampled_token_ids[item.req_id] = [7]
    return out


def make(num_blocks: int, budget: int) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 4, True), 8, budget, num_blocks * 4)


def request(req_id: str, prompt: list[int], max_tokens: int, k: int | None) -> Request:
    params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=k)
    return Request(req_id, prompt, params, max_tokens=max_tokens)


def run(
    scheduler: Scheduler, requests: dict[str, Request]
) -> list[tuple[SchedulerOutput, list[RequestUpdate]]]:
    steps = []
    while scheduler.has_unfinished_requests():
        sched = scheduler.schedule()
        steps.append((sched, scheduler.update_from_output(sched, execute(sched, requests))))
    return steps


def test_chunks_skip_the_prefix_cache_and_deliver_every_entry_once():
    scheduler = make(num_blocks=16, budget=5)
    prompt = list(range(100, 112))
    warm = request("warm", prompt, 2, None)
    asking = request("r", prompt, 3, 2)
    requests = {"warm": warm, "r": asking}
    scheduler.add_request(warm)
    run(scheduler, requests)
    scheduler.add_request(asking)
    steps = run(scheduler, requests)

    chunks = [s for sched, _ in steps for s in sched.scheduled]
    assert chunks[0].num_computed_tokens == 0  # the cached 8-token prefix is not used
    assert asking.num_cached_tokens == 0
    prefill = [c for c in chunks if c.num_computed_tokens < len(prompt)]
    assert [c.num_computed_tokens for c in prefill] == [0, 5, 10]
    assert all(c.num_prompt_logprobs == 2 for c in prefill[:-1])
    assert all(c.num_prompt_logprobs is None for c in chunks[len(prefill) :])  # decodes
    updates = [u for _, ups in steps for u in ups]
    assert updates[0].prompt_logprobs == [entry(prompt, p) for p in range(len(prompt) - 1)]
    assert all(u.prompt_logprobs is None for u in updates[1:])
    # The prefix was there to hit: a plain request with the same prompt does.
    plain = request("p", prompt, 1, None)
    scheduler.add_request(plain)
    run(scheduler, {"p": plain})
    assert plain.num_cached_tokens == 8


def test_preemption_mid_prefill_recomputes_without_duplicates():
    """3 blocks of 4: `b` (decoding) needs the block `a` (mid-prefill) would take, so `a`,
    admitted last, is preempted (again while recomputing) with part of its prompt logprobs held."""
    scheduler = make(num_blocks=3, budget=4)
    b = request("b", [1, 2, 3], 5, None)
    a = request("a", list(range(200, 208)), 2, 0)
    requests = {"a": a, "b": b}
    scheduler.add_request(b)
    scheduler.add_request(a)
    held_at_preemption: list[int] = []
    updates: list[RequestUpdate] = []
    while scheduler.has_unfinished_requests():
        sched = scheduler.schedule()
        if "a" in sched.preempted_req_ids:
            held_at_preemption.append(len(a.prompt_logprobs))
        updates += scheduler.update_from_output(sched, execute(sched, requests))
    assert a.num_preemptions >= 1 and max(held_at_preemption) > 0
    first = next(u for u in updates if u.req_id == "a")
    assert first.prompt_logprobs == [entry(a.prompt_token_ids, p) for p in range(7)]
