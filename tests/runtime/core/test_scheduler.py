"""Scheduler on real KV objects with small sizes: lifecycle, budget, chunked prefill,
preemption, FCFS, stop conditions, aborts, n samples and cache salts."""

from __future__ import annotations

import pytest

from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.request import Request, RequestStatus
from pinnace.runtime.sampling_params import SamplingParams


def test_requests_finish_with_their_tokens_and_free_every_block(make_harness):
    h = make_harness(num_blocks=16, block_size=4, max_num_batched_tokens=16)
    lengths = [1, 3, 4, 5, 9, 17]
    for i, n in enumerate(lengths):
        h.add(f"r{i}", list(range(10 * i, 10 * i + n)), max_tokens=3 + i)
    h.run()
    for i, n in enumerate(lengths):
        request = h.all_requests[f"r{i}"]
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert h.finish_reasons[f"r{i}"] == "length"
        assert len(request.output_token_ids) == 3 + i
        assert h.emitted[f"r{i}"] == request.output_token_ids
        assert request.prompt_token_ids == list(range(10 * i, 10 * i + n))
    h.assert_no_leaks()
    # Runners learn of every finished request in a later step (to drop per-request state).
    reported = set().union(*(out.finished_req_ids for out in h.history))
    reported |= h.scheduler.schedule().finished_req_ids
    assert reported == set(h.all_requests)


def test_abort_of_waiting_and_running_requests_frees_their_blocks(make_harness):
    h = make_harness(num_blocks=16, block_size=4, max_num_seqs=2)
    h.add("a", list(range(1, 10)), max_tokens=6)
    h.add("b", list(range(20, 30)), max_tokens=6)
    h.add("c", list(range(40, 45)), max_tokens=6)
    h.step()
    h.step()
    assert [r.req_id for r in h.scheduler.running] == ["a", "b"]
    assert [r.req_id for r in h.scheduler.waiting] == ["c"]
    b_blocks = len(h.kv.block_ids("b"))
    free_before = h.kv.pool.num_free_blocks

    h.abort("b", "c", "no-such-request")

    for req_id in ("b", "c"):
        assert h.all_requests[req_id].status == RequestStatus.FINISHED_ABORTED
        assert req_id not in h.scheduler.requests
    assert [r.req_id for r in h.scheduler.running] == ["a"]
    assert not h.scheduler.waiting
    assert h.kv.pool.num_free_blocks == free_before + b_blocks
    h.check_ref_counts()
    out, _ = h.step()
    assert out.finished_req_ids == {"b", "c"}
    assert [s.req_id for s in out.scheduled] == ["a"]
    h.run()
    h.abort("a")  # already finished: ignored
    assert h.all_requests["a"].status == RequestStatus.FINISHED_LENGTH
    assert len(h.emitted["a"]) == 6
    h.assert_no_leaks()


def test_abort_while_the_step_runs_drops_its_result(make_harness):
    h = make_harness(num_blocks=8, block_size=4)
    h.add("a", [1, 2, 3], max_tokens=4)
    out = h.scheduler.schedule()
    result = h.execute(out)
    h.abort("a")
    assert h.scheduler.update_from_output(out, result) == []
    assert h.all_requests["a"].output_token_ids == []
    h.assert_no_leaks()


@pytest.mark.parametrize("enable_caching", [True, False])
def test_preemption_frees_a_request_and_later_restores_it(
    make_harness, scheduled_of, enable_caching
):
    # 6 blocks of 4 tokens; each request grows from 8 to 20 tokens (5 blocks): they
    # cannot both finish side by side, so the later one is preempted. "third" waits for a
    # sequence slot and must not overtake the preempted request.
    h = make_harness(num_blocks=6, block_size=4, max_num_seqs=2, enable_caching=enable_caching)
    h.add("first", list(range(100, 108)), max_tokens=12)
    h.add("second", list(range(200, 208)), max_tokens=12)
    h.add("third", [300, 301], max_tokens=2)
    second = h.all_requests["second"]
    tokens_at_preemption = None
    restored = None
    while h.scheduler.has_unfinished_requests():
        out, _ = h.step()
        if tokens_at_preemption is not None and restored is None:
            restored = scheduled_of(out, "second")
        if restored is None:
            assert scheduled_of(out, "third") is None
        if out.preempted_req_ids:
            assert out.preempted_req_ids == {"second"}  # the most recently admitted
            assert [s.req_id for s in out.scheduled] == ["first"]
            assert second.status == RequestStatus.PREEMPTED
            assert second.num_computed_tokens == 0
            assert h.kv.block_ids("second") == []
            assert [r.req_id for r in h.scheduler.waiting] == ["second", "third"]
            tokens_at_preemption = list(second.all_token_ids)
    assert tokens_at_preemption is not None, "the test expects a preemption"
    assert restored is not None
    # Recompute from where the prefix cache leaves off, over prompt + outputs so far.
    assert second.all_token_ids[: len(tokens_at_preemption)] == tokens_at_preemption
    start = restored.num_computed_tokens
    assert start % 4 == 0 and (start == 0 or enable_caching)
    assert restored.token_ids == tokens_at_preemption[start:]
    assert restored.needs_sample
    assert second.num_preemptions >= 1
    assert h.all_requests["first"].num_preemptions == 0
    assert h.scheduler.stats().num_preemptions == h.scheduler.num_preemptions >= 1
    for req_id, max_tokens in (("first", 12), ("second", 12), ("third", 2)):
        request = h.all_requests[req_id]
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert h.emitted[req_id] == request.output_token_ids
        assert len(request.output_token_ids) == max_tokens
    assert second.prompt_token_ids == list(range(200, 208))
    h.assert_no_leaks()


def test_the_latest_request_preempts_itself_when_earlier_ones_took_the_last_block(
    make_harness, scheduled_of
):
    # 4 blocks of 2 tokens. Step 3: "early" took the last free block in step 2, and
    # "late" (the most recently admitted) needs one: it is its own victim.
    h = make_harness(num_blocks=4, block_size=2)
    h.add("early", [1, 2], max_tokens=3)
    h.add("late", [3, 4, 5], max_tokens=3)
    h.step()
    h.step()
    out, _ = h.step()
    assert out.preempted_req_ids == {"late"}
    assert [s.req_id for s in out.scheduled] == ["early"]
    assert h.all_requests["late"].status == RequestStatus.PREEMPTED
    h.run()
    assert [len(h.emitted[r]) for r in ("early", "late")] == [3, 3]
    assert h.all_requests["late"].num_preemptions == 1
    h.assert_no_leaks()


def test_chunked_prefill_mixes_prefill_chunks_with_decodes(make_harness, scheduled_of):
    h = make_harness(num_blocks=32, block_size=4, max_num_batched_tokens=8)
    h.add("decoder", [1, 2, 3], max_tokens=10)
    out, _ = h.step()
    assert scheduled_of(out, "decoder").num_scheduled_tokens == 3
    h.add("long", list(range(100, 120)), max_tokens=2)
    chunks = []
    for _ in range(3):
        out, updates = h.step()
        decode, chunk = scheduled_of(out, "decoder"), scheduled_of(out, "long")
        assert [s.req_id for s in out.scheduled] == ["decoder", "long"]  # running first
        assert decode.num_scheduled_tokens == 1 and decode.needs_sample
        assert out.total_num_scheduled_tokens <= 8
        chunks.append((chunk.num_computed_tokens, chunk.num_scheduled_tokens, chunk.needs_sample))
        sampled = {u.req_id for u in updates}
        assert ("long" in sampled) == chunk.needs_sample
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert len(h.all_requests["long"].output_token_ids) == 1
    h.run()
    h.assert_no_leaks()


def test_long_prompt_alone_is_split_into_budget_sized_chunks(make_harness):
    h = make_harness(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    h.add("long", list(range(20)), max_tokens=3)
    h.run()
    assert [out.total_num_scheduled_tokens for out in h.history] == [8, 8, 4, 1, 1]


def test_max_num_seqs_caps_the_batch(make_harness):
    h = make_harness(num_blocks=32, block_size=4, max_num_seqs=2)
    for i in range(5):
        h.add(f"r{i}", [i + 1] * 3, max_tokens=2 + i)
    h.run()
    assert max(len(out.scheduled) for out in h.history) == 2
    assert h.first_admitted == [f"r{i}" for i in range(5)]
    h.assert_no_leaks()


def test_fcfs_the_head_of_the_queue_is_never_overtaken(make_harness, scheduled_of):
    # `big` needs 5 of the 4 blocks left while `holder` runs; `small` would fit but
    # must wait behind it.
    h = make_harness(num_blocks=8, block_size=4)
    h.add("holder", list(range(16)), max_tokens=8)
    h.add("big", list(range(100, 120)), max_tokens=2)
    h.add("small", [7, 8], max_tokens=2)
    while h.all_requests["holder"].status == RequestStatus.RUNNING or len(h.history) == 0:
        out, _ = h.step()
        assert scheduled_of(out, "small") is None
        assert scheduled_of(out, "big") is None
    h.run()
    assert h.first_admitted == ["holder", "big", "small"]
    h.assert_no_leaks()


EOS = 0


@pytest.mark.parametrize(
    ("params", "script", "outputs", "finish", "stop_reason"),
    [
        (dict(), [5, EOS, 6], [5, EOS], "stop", None),
        (dict(ignore_eos=True), [5, EOS, 6, 7], [5, EOS, 6, 7], "length", None),
        (dict(stop_token_ids=[7]), [5, 7, 6], [5, 7], "stop", 7),
        (dict(min_tokens=3), [5, EOS, EOS, 6], [5, EOS, EOS], "stop", None),
        (dict(min_tokens=3, stop_token_ids=[7]), [7, 7, 7, 7], [7, 7, 7], "stop", 7),
        (dict(), [5, 6, 7, 8], [5, 6, 7, 8], "length", None),
    ],
)
def test_stop_on_eos_stop_token_ids_max_tokens_and_min_tokens(
    make_harness, params, script, outputs, finish, stop_reason
):
    h = make_harness(num_blocks=8, block_size=4, sample=lambda r: script[r.num_output_tokens])
    h.add("r", [1, 2, 3], max_tokens=4, eos_token_ids=frozenset({EOS}), **params)
    h.run()
    request = h.all_requests["r"]
    assert request.output_token_ids == outputs == h.emitted["r"]
    assert h.finish_reasons["r"] == finish == request.status.finish_reason
    assert h.stop_reasons["r"] == stop_reason
    h.assert_no_leaks()


def test_stop_at_the_context_length(make_harness):
    h = make_harness(num_blocks=8, block_size=4, max_model_len=8)
    h.add("r", list(range(1, 7)), max_tokens=10)
    h.run()
    assert len(h.all_requests["r"].output_token_ids) == 2
    assert h.finish_reasons["r"] == "length"
    h.assert_no_leaks()


def test_n_samples_share_prompt_blocks_through_the_prefix_cache(make_harness, scheduled_of):
    # The budget holds one 33-token prefill per step, so the second sample is scheduled
    # one step later and finds the first sample's 8 full prompt blocks in the cache.
    h = make_harness(num_blocks=32, block_size=4, max_num_batched_tokens=33)
    prompt = list(range(100, 133))
    params = SamplingParams(n=2, seed=7, max_tokens=3)
    for i in range(2):
        h.add_request(Request(f"p#{i}", prompt, params.for_sample(i), max_tokens=3))
    out, _ = h.step()
    assert [s.req_id for s in out.scheduled] == ["p#0"]
    out, _ = h.step()
    child = scheduled_of(out, "p#1")
    assert (child.num_computed_tokens, child.token_ids) == (32, [132])
    ids0, ids1 = h.kv.block_ids("p#0"), h.kv.block_ids("p#1")
    assert ids1[:8] == ids0[:8] and ids1[8] != ids0[8]
    assert all(h.kv.pool.blocks[b].ref_cnt == 2 for b in ids0[:8])
    assert h.all_requests["p#1"].num_cached_tokens == 32
    stats = h.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (66, 32)
    assert [h.all_requests[f"p#{i}"].sampling_params.seed for i in range(2)] == [7, 8]
    h.run()
    assert all(len(h.emitted[f"p#{i}"]) == 3 for i in range(2))
    h.assert_no_leaks()


def test_cache_salt_isolates_prefixes(make_harness):
    h = make_harness(num_blocks=32, block_size=4)
    prompt = list(range(1, 18))  # 4 full blocks + 1 token
    h.add("alice-1", prompt, max_tokens=1, cache_salt="alice")
    h.run()
    for req_id, salt in [("bob", "bob"), ("nobody", None), ("alice-2", "alice")]:
        h.add(req_id, prompt, max_tokens=1, cache_salt=salt)
        h.run()
    cached = {r: h.all_requests[r].num_cached_tokens for r in h.all_requests}
    assert cached == {"alice-1": 0, "bob": 0, "nobody": 0, "alice-2": 16}
    h.assert_no_leaks()


def test_duplicate_request_id_is_rejected(make_harness):
    h = make_harness(num_blocks=4, block_size=4)
    h.add("r", [1])
    with pytest.raises(ValueError, match="'r'"):
        h.add("r", [2])


@pytest.mark.parametrize("kwargs", [dict(max_num_seqs=0), dict(max_num_batched_tokens=0)])
def test_scheduler_limits_must_be_positive(make_harness, kwargs):
    h = make_harness(num_blocks=4, block_size=4)
    limits = dict(max_num_seqs=1, max_num_batched_tokens=1, max_model_len=16) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Scheduler(h.kv, **limits)
