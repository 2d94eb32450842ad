"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Each step: running requests first (FCFS order; one decode token each plus its proposed
tokens under speculative decoding, or the next chunk of an unfinished prefill), then
waiting requests while budget, sequence slots and KV blocks last. When a running request
cannot get a block, the most recently admitted running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (its prefix
blocks often survive in the prefix cache).

LoRA: running requests never use more distinct adapters than `max_loras` (the device
slots), so neither does any step. A waiting request whose adapter would need one more
slot is passed over and keeps its place; the requests behind it are still admitted in
order if they fit (vLLM's rule).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable

from pinnace.runtime.core.block_pool import KVBlock
from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import (
    Logprobs,
    ModelRunnerOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
    SpecDecodingStats,
)
from pinnace.runtime.request import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_loras: int = 0,  # 0: LoRA off (every request runs the base model)
        num_lookahead_tokens: int = 0,  # slots reserved past each step (a draft's proposals)
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1.")
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.num_lookahead_tokens = num_lookahead_tokens
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.spec_decoding = SpecDecodingStats()
        self._finished_ids: set[str] = set()

    # -- queue management ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use.")
        if request.lora_id and self.max_loras < 1:
            raise ValueError("this scheduler runs without LoRA (max_loras=0).")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def finish_requests(
        self, req_ids: list[str], status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """End requests from outside the step (abort, stop string); unknown ids are ignored."""
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request in self.running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.stop_reason = stop_reason
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.req_id]
        self._finished_ids.add(request.req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- scheduling ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(out, budget)
        budget -= out.total_num_scheduled_tokens
        if not preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            # Proposed tokens count in the budget; the budget may cut some of them off.
            num_new = min(request.num_tokens_with_spec - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(
                request, num_new, num_lookahead_tokens=self.num_lookahead_tokens
            ):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                i += 1
        return preempted

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_req_ids.add(request.req_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        loras = {r.lora_id for r in self.running if r.lora_id}
        passed_over: list[Request] = []  # no free adapter slot: they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.lora_id and request.lora_id not in loras and len(loras) >= self.max_loras:
                passed_over.append(self.waiting.popleft())
                continue
            # Prompt logprobs need logits at every prompt position: no prefix-cache hit
            # (vLLM does the same); the request's blocks are still cached for others.
            blocks: list[KVBlock] = []
            num_hit = 0
            if not request.needs_prompt_logprobs:
                blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(request, num_new, blocks, self.num_lookahead_tokens):
                break  # FCFS: nobody overtakes the head of the queue
            self.kv.record_prefix_query(request.num_tokens, num_hit)
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            if request.lora_id:
                loras.add(request.lora_id)
        self.waiting.extendleft(reversed(passed_over))

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        """`num_new` tokens from num_computed_tokens: known ones first, then proposed."""
        start = request.num_computed_tokens
        num_known = min(num_new, request.num_tokens - start)
        spec = request.spec_token_ids[: num_new - num_known]
        return ScheduledRequest(
            req_id=request.req_id,
            token_ids=request.all_token_ids[start : start + num_known] + spec,
            num_computed_tokens=start,
            block_ids=self.kv.block_ids(request.req_id),
            sampling_params=request.sampling_params,
            needs_sample=start + num_known == request.num_tokens,
            num_output_tokens=request.num_output_tokens,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            lora_id=request.lora_id,
            num_prompt_logprobs=(
                request.sampling_params.prompt_logprobs
                if request.needs_prompt_logprobs and start < request.num_prompt_tokens - 1
                else None
            ),
            spec_token_ids=spec,
        )

    # -- after the forward pass ---------------------------------------------------------

    def update_from_output(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Advance token accounting (rolling back rejected proposals), append the sampled
        tokens one at a time with token-level stops, and take the next proposals."""
        updates = []
        for item in scheduled.scheduled:
            request = self.requests.get(item.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            chunk = result.prompt_logprobs.get(item.req_id)
            if chunk is not None:
                # Entry j scores prompt token j + 1; a recompute after preemption rewrites
                # the same entries, so the list never holds one twice.
                start = item.num_computed_tokens
                request.prompt_logprobs[start : start + len(chunk)] = chunk
            request.num_computed_tokens += item.num_scheduled_tokens
            token_ids = result.sampled_token_ids.get(item.req_id)
            if not token_ids:
                continue
            # k proposals scheduled, a accepted: a + 1 tokens came back. The KV of the k - a
            # rejected ones is stale: roll back so the next step overwrites their slots.
            num_rejected = len(item.spec_token_ids) + 1 - len(token_ids)
            request.num_computed_tokens -= num_rejected
            if item.spec_token_ids:
                self.spec_decoding.observe(len(item.spec_token_ids), len(token_ids) - 1)
            request.spec_token_ids = []
            update = self._append_tokens(request, token_ids, result.logprobs.get(item.req_id))
            if update.finish_reason is None:
                request.spec_token_ids = self._fit_proposal(
                    request, result.spec_token_ids.get(item.req_id, [])
                )
            updates.append(update)
        return updates

    def _append_tokens(
        self, request: Request, token_ids: list[int], logprobs: list[Logprobs] | None
    ) -> RequestUpdate:
        """Append tokens in order, stopping at the first that ends the request."""
        status = None
        num_new = 0
        for token_id in token_ids:
            request.append_output_token(token_id)
            num_new += 1
            status = self._check_stop(request, token_id)
            if status is not None:
                break
        update = RequestUpdate(
            request.req_id,
            token_ids[:num_new],
            logprobs=logprobs[:num_new] if logprobs is not None else None,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )
        is_first = request.num_output_tokens == num_new
        if is_first and request.sampling_params.prompt_logprobs is not None:
            update.prompt_logprobs = list(request.prompt_logprobs)
        if status is not None:
            self.running.remove(request)
            self._finish(request, status)
            update.finish_reason = status.finish_reason
            update.stop_reason = request.stop_reason
        return update

    def _fit_proposal(self, request: Request, spec_token_ids: list[int]) -> list[int]:
        """Proposals the request can still use: a step yields at most k + 1 tokens, which
        must fit max_tokens and the context length."""
        room = min(
            request.max_tokens - request.num_output_tokens,
            self.max_model_len - request.num_tokens,
        )
        return spec_token_ids[: max(room - 1, 0)]

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if request.num_output_tokens < params.min_tokens:
            return None
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in (params.stop_token_ids or ()):
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.pool.num_queries,
            prefix_cache_hits=self.kv.pool.num_hits,
            num_preemptions=self.num_preemptions,
            running_lora_adapters=_count_adapters(self.running) if self.max_loras else {},
            waiting_lora_adapters=_count_adapters(self.waiting) if self.max_loras else {},
            spec_decoding=copy.deepcopy(self.spec_decoding),
        )


def _count_adapters(requests: Iterable[Request]) -> dict[str, int]:
    """Adapter name -> requests using it."""
    counts: dict[str, int] = {}
    for request in requests:
        if request.lora_name is not None:
            counts[request.lora_name] = counts.get(request.lora_name, 0) + 1
    return counts
