"""The scheduler's LoRA rules (pure Python): never more adapters in a step than slots,
passed-over requests keep their place, and the prefix cache is keyed by adapter."""

from __future__ import annotations

import pytest

from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import ModelRunnerOutput, SchedulerOutput
from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.request import Request
from pinnace.runtime.sampling_params import SamplingParams


def make_request(req_id: str, lora_id: int, prompt: list[int], max_tokens: int = 3) -> Request:
    return Request(
        req_id=req_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        max_tokens=max_tokens,
        lora_id=lora_id,
        lora_name=f"adapter-{lora_id}" if lora_id else None,
    )


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    sampled = {s.req_id: [7] for s in out.scheduled if s.needs_sample}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def test_a_step_never_holds_more_adapters_than_slots() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), 16, 256, 128, max_loras=2)
    # Adapters 1, 2, 3 interleaved with base requests; 3 must wait for a free slot.
    order = [1, 0, 2, 3, 1, 0, 3, 2]
    for i, lora in enumerate(order):
        scheduler.add_request(make_request(f"r{i}", lora, [i + 1] * 5, max_tokens=2 + i))
    first = run_step(scheduler)
    assert [s.req_id for s in first.scheduled] == ["r0", "r1", "r2", "r4", "r5", "r7"]
    # The passed-over requests for adapter 3 keep their place at the head, in order.
    assert [r.req_id for r in scheduler.waiting] == ["r3", "r6"]
    stats = scheduler.stats()
    assert stats.running_lora_adapters == {"adapter-1": 2, "adapter-2": 2}
    assert stats.waiting_lora_adapters == {"adapter-3": 2}
    seen = [first]
    while scheduler.has_unfinished_requests():
        seen.append(run_step(scheduler))
    for out in seen:
        assert len({s.lora_id for s in out.scheduled if s.lora_id}) <= 2
    assert any(3 in {s.lora_id for s in out.scheduled} for out in seen)  # 3 ran, later
    assert scheduler.kv.usage == 0.0


def test_one_adapter_slot_serialises_adapters_but_not_the_base_model() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), 16, 256, 128, max_loras=1)
    for i, lora in enumerate([1, 2, 0, 1]):
        scheduler.add_request(make_request(f"r{i}", lora, [9, 9, i], max_tokens=2))
    out = run_step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["r0", "r2", "r3"]
    assert [r.req_id for r in scheduler.waiting] == ["r1"]


def test_prefix_blocks_are_keyed_by_adapter() -> None:
    kv = KVCacheManager(32, 4)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    owner = make_request("base", 0, prompt)
    blocks, hit = kv.get_computed_blocks(owner)
    assert kv.allocate_slots(owner, len(prompt), blocks) and hit == 0
    for lora_id, expected in [(0, 8), (1, 0), (2, 0)]:
        _, hit = kv.get_computed_blocks(make_request(f"q{lora_id}", lora_id, prompt))
        assert hit == expected, lora_id
    adapter = make_request("a1", 1, prompt)
    blocks, _ = kv.get_computed_blocks(adapter)
    assert kv.allocate_slots(adapter, len(prompt), blocks)
    assert kv.get_computed_blocks(make_request("again", 1, prompt))[1] == 8
    assert kv.get_computed_blocks(make_request("other", 2, prompt))[1] == 0


def test_a_scheduler_without_lora_refuses_adapter_requests() -> None:
    scheduler = Scheduler(KVCacheManager(8, 4), 4, 64, 64)
    with pytest.raises(ValueError, match="without LoRA"):
        scheduler.add_request(make_request("a", 1, [1, 2]))
