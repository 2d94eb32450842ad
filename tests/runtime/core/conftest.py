"""A real Scheduler on a real KVCacheManager, driven by a fake model runner (no torch).

The fake runner stands in for the model. Each step it first writes, for every scheduled
token, a fingerprint of the token's whole prefix into a fake KV store (slot -> int), then
checks that every position each scheduled request attends to holds the fingerprint of
that request's own prefix. A wrong block table, a bad prefix hit or a block handed out
while still in use therefore fails the test, just as it would corrupt a real model's
output. Writes-before-reads mirrors the attention backends' invariant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import (
    ModelRunnerOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
)
from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.request import Request, RequestStatus
from pinnace.runtime.sampling_params import SamplingParams

# Picks the next token of a request. The default draws from one shared RNG, so a request
# whose tokens were lost and sampled again would get different ones.
SampleFn = Callable[[Request], int]
# Speculative decoding: proposals for a request after its step's new tokens.
ProposeFn = Callable[[Request, list[int]], list[int]]


def prefix_fingerprints(token_ids: list[int]) -> list[int]:
    """fp[p] identifies token_ids[: p + 1]: what the KV at position p depends on."""
    out, fp = [], 0
    for token in token_ids:
        fp = hash((fp, token))
        out.append(fp)
    return out


@dataclass
class Harness:
    """Drives schedule -> fake execute -> update_from_output and checks every step."""

    num_blocks: int
    block_size: int
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 64
    max_model_len: int | None = None
    enable_caching: bool = True
    sample: SampleFn | None = None
    seed: int = 0
    # With `propose`, verification follows `model_next_token`: a proposal is accepted
    # while it equals what that fake model would have produced.
    propose: ProposeFn | None = None

    kv: KVCacheManager = field(init=False)
    scheduler: Scheduler = field(init=False)
    kv_store: dict[int, int] = field(init=False, default_factory=dict)
    # Everything the scheduler ever reported, per request.
    emitted: dict[str, list[int]] = field(init=False, default_factory=dict)
    finish_reasons: dict[str, str] = field(init=False, default_factory=dict)
    stop_reasons: dict[str, int | str | None] = field(init=False, default_factory=dict)
    all_requests: dict[str, Request] = field(init=False, default_factory=dict)
    history: list[SchedulerOutput] = field(init=False, default_factory=list)
    first_admitted: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.kv = KVCacheManager(self.num_blocks, self.block_size, self.enable_caching)
        max_len = self.max_model_len or self.num_blocks * self.block_size
        self.scheduler = Scheduler(self.kv, self.max_num_seqs, self.max_num_batched_tokens, max_len)
        self._rng = random.Random(self.seed)

    # -- driving --------------------------------------------------------------------------

    def add(
        self,
        req_id: str,
        prompt: list[int],
        max_tokens: int = 4,
        eos_token_ids: frozenset[int] = frozenset(),
        cache_salt: str | None = None,
        **params: Any,
    ) -> Request:
        request = Request(
            req_id=req_id,
            prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(max_tokens=max_tokens, **params),
            eos_token_ids=eos_token_ids,
            max_tokens=max_tokens,
            cache_salt=cache_salt,
        )
        return self.add_request(request)

    def add_request(self, request: Request) -> Request:
        self.scheduler.add_request(request)
        self.all_requests[request.req_id] = request
        self.emitted[request.req_id] = []
        return request

    def step(self) -> tuple[SchedulerOutput, list[RequestUpdate]]:
        out = self.scheduler.schedule()
        self.check_step(out)
        result = self.execute(out)
        updates = self.scheduler.update_from_output(out, result)
        for update in updates:
            self.emitted[update.req_id].extend(update.new_token_ids)
            if update.finish_reason is not None:
                self.finish_reasons[update.req_id] = update.finish_reason
                self.stop_reasons[update.req_id] = update.stop_reason
        self.history.append(out)
        return out, updates

    def run(self, max_steps: int = 10_000) -> int:
        """Step until every request finished; returns the number of steps."""
        steps = 0
        while self.scheduler.has_unfinished_requests():
            self.step()
            steps += 1
            assert steps <= max_steps, "the scheduler stopped making progress"
        return steps

    def abort(self, *req_ids: str) -> None:
        self.scheduler.finish_requests(list(req_ids), RequestStatus.FINISHED_ABORTED)
        for req_id in req_ids:
            self.finish_reasons.setdefault(req_id, "abort")

    # -- the fake model -------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.block_size
        for item in out.scheduled:  # 1) write this step's KV
            fps = prefix_fingerprints(self._scheduled_tokens(item))
            for pos in range(
                item.num_computed_tokens, item.num_computed_tokens + len(item.token_ids)
            ):
                self.kv_store[item.block_ids[pos // bs] * bs + pos % bs] = fps[pos]
        result = ModelRunnerOutput()
        for item in out.scheduled:  # 2) attend: every visible position holds our prefix
            request = self.all_requests[item.req_id]
            fps = prefix_fingerprints(self._scheduled_tokens(item))
            seq_len = item.num_computed_tokens + item.num_scheduled_tokens
            for pos in range(seq_len):
                slot = item.block_ids[pos // bs] * bs + pos % bs
                assert self.kv_store.get(slot) == fps[pos], (
                    f"{item.req_id}: KV at position {pos} (slot {slot}) is not its own"
                )
            if not item.needs_sample:
                continue
            if self.propose is None:
                sample = self.sample or self._random_token
                result.sampled_token_ids[item.req_id] = [sample(request)]
                continue
            new = self._verify(request, item.spec_token_ids)
            result.sampled_token_ids[item.req_id] = new
            result.spec_token_ids[item.req_id] = self.propose(request, new)
        return result

    def _scheduled_tokens(self, item: ScheduledRequest) -> list[int]:
        """The request's tokens as this step sees them: known ones, then its proposals."""
        request = self.all_requests[item.req_id]
        return request.all_token_ids[: item.num_computed_tokens] + item.token_ids

    @staticmethod
    def model_next_token(token_ids: list[int]) -> int:
        """A deterministic fake model: the next token is a function of the whole prefix."""
        return 1000 + prefix_fingerprints(token_ids)[-1] % 1000

    def _verify(self, request: Request, spec_token_ids: list[int]) -> list[int]:
        tokens = list(request.all_token_ids)
        new = []
        for draft in spec_token_ids:
            new.append(self.model_next_token(tokens))
            if new[-1] != draft:
                return new
            tokens.append(draft)
        return [*new, self.model_next_token(tokens)]

    def _random_token(self, request: Request) -> int:
        return self._rng.randrange(1000, 2000)

    # -- invariants -----------------------------------------------------------------------

    def check_step(self, out: SchedulerOutput) -> None:
        """Limits and token accounting that must hold in every step."""
        sched = self.scheduler
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        ids = [s.req_id for s in out.scheduled]
        assert len(set(ids)) == len(ids)
        for item in out.scheduled:
            request = sched.requests[item.req_id]
            if item.req_id not in self.first_admitted:
                self.first_admitted.append(item.req_id)
            start, num = item.num_computed_tokens, item.num_scheduled_tokens
            num_spec = len(item.spec_token_ids)
            assert num >= 1
            known = request.all_token_ids[start : start + num - num_spec]
            assert item.token_ids[: num - num_spec] == known
            assert item.spec_token_ids == request.spec_token_ids[:num_spec]
            assert item.needs_sample == (start + num - num_spec == request.num_tokens)
            assert not num_spec or item.needs_sample
            assert len(item.block_ids) * self.block_size >= start + num
            assert item.num_output_tokens == request.num_output_tokens
        self.check_ref_counts()

    def check_ref_counts(self) -> None:
        """Each block's ref count is the number of running block tables holding it."""
        pool = self.kv.pool
        refs = [0] * pool.num_blocks
        for request in self.scheduler.running:
            for block_id in self.kv.block_ids(request.req_id):
                refs[block_id] += 1
        for request in self.scheduler.waiting:
            assert self.kv.block_ids(request.req_id) == [], "a waiting request holds blocks"
        assert [b.ref_cnt for b in pool.blocks] == refs
        assert pool.num_free_blocks == refs.count(0)

    def assert_no_leaks(self) -> None:
        assert not self.scheduler.has_unfinished_requests()
        assert not self.scheduler.running and not self.scheduler.waiting
        assert self.kv.pool.num_free_blocks == self.num_blocks
        assert all(b.ref_cnt == 0 for b in self.kv.pool.blocks)
        assert self.kv.usage == 0.0


@pytest.fixture
def make_harness() -> Callable[..., Harness]:
    """Factory: make_harness(num_blocks=, block_size=, max_num_seqs=, ...) -> Harness."""
    return Harness


@pytest.fixture
def scheduled_of() -> Callable[[SchedulerOutput, str], ScheduledRequest | None]:
    """The step's entry for one request, or None if it was not scheduled."""

    def find(out: SchedulerOutput, req_id: str) -> ScheduledRequest | None:
        return next((s for s in out.scheduled if s.req_id == req_id), None)

    return find
