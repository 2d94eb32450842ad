"""MPLLMEngine: `LLMEngine`'s interface with the engine core in a process of its own.

`LLM(model, enable_multiprocessing=True)` uses it (vLLM's name: `LLMEngine.from_engine_args
(..., enable_multiprocessing=True)`; vLLM's `LLM` reads VLLM_ENABLE_V1_MULTIPROCESSING).
The core process is the one `pinnace serve` starts (core_proc.py, over core_client.MPClient);
this process keeps tokenizing, detokenizing and stop strings, so they overlap the core's
next step instead of adding to it. `step()` blocks for the core's next step:

    add_request -> AddRequests ──────────>  core: schedule -> execute -> update, again
    step() <── StepOutputs (one per core step, read in order; the core runs ahead)
    add_lora / embed / ... -> UtilityCall -> answered between two steps
"""

from __future__ import annotations

import collections
import itertools
import os
import weakref
from typing import Any

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.core_client import CoreStartError, MPClient
from pinnace.runtime.engine.core_messages import (
    AbortRequests,
    AddRequests,
    CoreDead,
    Event,
    RequestsFailed,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    dumps,
    loads,
    to_wire,
    updates_from_wire,
)
from pinnace.runtime.engine.engine_core import require_runner
from pinnace.runtime.engine.grammar_compiler import check_constraint
from pinnace.runtime.engine.model_facts import ModelFacts
from pinnace.runtime.engine.output_processor import OutputProcessor
from pinnace.runtime.engine.streams import EngineDeadError, EngineStepError
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams, StructuredOutputsParams
from pinnace.runtime.worker.pooler import PoolingConfig, pooling_from_folder

POLL_MS = 100  # how often a blocked read checks that the core still runs


class MPLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.client = MPClient(config)
        try:
            self.facts = ModelFacts.of_ready(config, self.client.wait_ready())
        except BaseException:
            self.client.shutdown(5.0)
            raise
        # The core process stops with this engine, or at exit at the latest.
        self._finalizer = weakref.finalize(self, self.client.shutdown, 10.0)
        self.tokenizer = self.facts.tokenizer
        self.model_config = self.facts.model_config
        self.max_model_len = self.facts.max_model_len
        self.eos_token_ids = self.facts.eos_token_ids
        self.vocab_size = self.facts.vocab_size
        self.runner_type = self.facts.runner_type
        is_folder = os.path.isdir(config.model)  # as EngineCore's default pooling
        self.pooling = pooling_from_folder(config.model) if is_folder else PoolingConfig()
        self.output_processor = OutputProcessor(self.tokenizer)
        self._events: collections.deque[Event] = collections.deque()  # read, not yet used
        self._call_ids = itertools.count(1)
        self._stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)

    # -- intake ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.facts.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return self.facts.validate(prompt_token_ids, params)

    def check_constraint(self, spec: StructuredOutputsParams) -> None:
        """ValueError for a constraint that cannot compile; the core compiles it."""
        check_constraint(spec)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request in the core (a failure there, say an adapter gone, is raised by
        a later `step`)."""
        if not self.client.is_alive:
            raise EngineDeadError("the engine core process is not running.")
        requests = self.facts.prepare(
            self.output_processor, request_id, prompt, params, cache_salt, lora_request
        )
        self.client.send(AddRequests([to_wire(r) for r in requests]))

    def abort_request(self, request_ids: list[str]) -> None:
        req_ids = [r for i in request_ids for r in self.output_processor.abort_request(i)]
        if req_ids and self.client.is_alive:
            self.client.send(AbortRequests(req_ids))

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """The core's next step, as an output per request that made progress ([] when
        nothing is queued). Raises what the core reports: EngineStepError for a failed
        step, a refused request's error, EngineDeadError when the core is gone."""
        if not self.output_processor.has_unfinished_requests():
            return []
        event = self._next_event()
        if isinstance(event, RequestsFailed):
            self.abort_request(sorted({r.partition("#")[0] for r in event.req_ids}))
            raise loads(event.error)
        if not isinstance(event, StepOutputs):
            return []  # an answer nobody waits for any more
        self._stats = event.stats
        if event.error is not None:
            self.abort_request(sorted({r.partition("#")[0] for r in event.failed_ids}))
            raise EngineStepError(f"generation failed: {event.error}")
        processed = self.output_processor.process(updates_from_wire(event.updates))
        if processed.stopped:  # the core learns of it with its next command read
            self.client.send(AbortRequests(processed.stopped, stopped=True))
        return processed.outputs

    def _next_event(self) -> Event:
        if self._events:
            return self._events.popleft()
        while True:
            event = self.client.recv(POLL_MS)
            if event is not None:
                break
            if not self.client.is_alive:
                raise EngineDeadError("the engine core process is gone.")
        if isinstance(event, CoreDead):
            self.shutdown()
            raise EngineDeadError(f"the engine core died: {event.reason}")
        return event

    def _call(self, method: str, *args: Any) -> Any:
        """Run a core method between two steps; the events read meanwhile wait for step()."""
        call_id = next(self._call_ids)
        self.client.send(UtilityCall(call_id, method, dumps(args)))
        read: list[Event] = []
        try:
            while True:
                event = self._next_event()
                if isinstance(event, UtilityResult) and event.call_id == call_id:
                    result = loads(event.result)
                    if event.failed:
                        raise result
                    return result
                read.append(event)
        finally:
            self._events.extendleft(reversed(read))

    # -- what LLM asks besides requests ------------------------------------------------------

    def embed(
        self, prompts: list[str | list[int]], pooling: PoolingConfig | None = None
    ) -> list[EmbeddingRequestOutput]:
        self.require_runner("pooling")
        ids = [self.tokenize(p) for p in prompts]
        for prompt_ids in ids:
            self.validate(prompt_ids, SamplingParams(max_tokens=1))
        result: list[EmbeddingRequestOutput] = self._call("embed", ids, pooling)
        return result

    def require_runner(self, needed: str) -> None:
        require_runner(self.runner_type, needed)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register an adapter (the core reads its folder); False if its id is taken."""
        result: bool = self._call("add_lora", lora_request)
        return result

    def remove_lora(self, lora_id: int) -> bool:
        result: bool = self._call("remove_lora", lora_id)
        return result

    def list_loras(self) -> set[int]:
        result: set[int] = self._call("list_loras")
        return result

    def reset_prefix_cache(self) -> bool:
        result: bool = self._call("reset_prefix_cache")
        return result

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def num_unfinished_requests(self) -> int:
        return self.output_processor.num_unfinished_requests()

    def stats(self) -> SchedulerStats:
        """Scheduler counters as of the last step read."""
        return self._stats

    @property
    def is_alive(self) -> bool:
        return self.client.is_alive

    def shutdown(self) -> None:
        """Stop the core process (idempotent; also done when the engine is collected)."""
        self._finalizer()


__all__ = ["CoreStartError", "MPLLMEngine"]
