"""AsyncLLMEngine: the front end of a served engine; each request gets a stream.

The engine core (scheduler + model) runs apart from the event loop: in its own process
for `pinnace serve` (`AsyncLLMEngine.spawn`, core_proc.py), or on a thread of this process
around an `LLMEngine` (`AsyncLLMEngine(engine)`). The front end keeps what needs no model:
tokenizing and validating, the n samples of a request, incremental detokenization, stop
strings, and the streams.

    event loop (HTTP handlers)                      engine core (process or thread)
    --------------------------                      -------------------------------
    generate() -> AddRequests ───────────────────>  add between two steps
                                                    step() -> one StepOutputs per step
    _on_event: OutputProcessor (text, stop strings) <──┘
               -> stream.queue of each request
               -> AbortRequests(stopped) for samples a stop string ended
    leaving `async with` unfinished
               -> AbortRequests ─────────────────>  KV blocks freed before the next step
    add_lora / remove_lora / embed -> UtilityCall ->  run between two steps -> UtilityResult
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.admission import WaitingLimit
from pinnace.runtime.engine.core_client import CoreClient, InprocClient, MPClient
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
)
from pinnace.runtime.engine.engine_core import require_runner
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.engine.model_facts import ModelFacts
from pinnace.runtime.engine.output_processor import OutputProcessor
from pinnace.runtime.engine.stat_logger import StatLogger
from pinnace.runtime.engine.step_profile import profile
from pinnace.runtime.engine.streams import (
    EngineDeadError,
    EngineFailedError,
    EngineStepError,
    QueueFullError,
    RequestObserver,
    RequestStream,
)
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import EmbeddingRequestOutput
from pinnace.runtime.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineFailedError",
    "EngineStepError",
    "QueueFullError",
    "RequestObserver",
    "RequestStream",
]

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(
        self,
        engine: LLMEngine | None = None,
        max_waiting_requests: int | None = None,
        observer: RequestObserver | None = None,
        *,
        client: CoreClient | None = None,
        facts: ModelFacts | None = None,
    ) -> None:
        """`AsyncLLMEngine(engine)`: its core steps on a thread of this process;
        `AsyncLLMEngine.spawn(config)`: in a process of its own."""
        if engine is not None:
            client, facts = InprocClient(engine), ModelFacts.of_core(engine.core)
        if client is None or facts is None:
            raise ValueError("AsyncLLMEngine needs an engine, or a core client and its facts.")
        self.engine = engine
        self.client = client
        self.facts = facts
        self.waiting_limit = WaitingLimit(max_waiting_requests, facts.config.max_num_seqs)
        self.observer = observer
        self.processor = OutputProcessor(facts.tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        self.stat_logger = StatLogger()  # the periodic log line
        self.profile = profile("frontend")
        self._dead: str | None = None
        self._started = False
        # Called on the event loop with the reason when the core dies (the server stops
        # and exits non-zero: lifecycle.py).
        self.on_failure: Callable[[str], None] | None = None

    @classmethod
    def spawn(
        cls,
        config: EngineConfig,
        max_waiting_requests: int | None = None,
        observer: RequestObserver | None = None,
    ) -> AsyncLLMEngine:
        """Start an engine-core process for `config` (returns once its model is loaded)."""
        client = MPClient(config)
        try:
            facts = ModelFacts.of_ready(config, client.wait_ready())
        except BaseException:
            client.shutdown(5.0)
            raise
        return cls(None, max_waiting_requests, observer, client=client, facts=facts)

    # -- read-only views ---------------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.facts.config

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.facts.tokenizer

    @property
    def model_config(self) -> PretrainedConfig:
        return self.facts.model_config

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.facts.eos_token_ids

    @property
    def runner_type(self) -> str:
        return self.facts.runner_type

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.facts.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raises ValueError with a user-facing message; returns the resolved max_tokens."""
        return self.facts.validate(prompt_token_ids, params)

    def stats(self) -> SchedulerStats:
        """Scheduler counters as of the core's last step."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._started and self._dead is None and self.client.is_alive

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineFailedError(f"the engine failed: {self._dead}")
        if not self.is_running:
            raise EngineDeadError("the engine is not running.")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Deliver the core's outputs on `loop` (default: the running one)."""
        if self._started:
            raise RuntimeError("the engine is already started.")
        self.client.start(loop or asyncio.get_running_loop(), self._on_event)
        self._started = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (its requests are aborted); open streams end with EngineDeadError."""
        self.client.shutdown(timeout)
        self._started = False
        # Written now: after SIGTERM uvicorn ends the process by the signal (no atexit).
        self.profile.dump()
        if self.engine is not None:
            self.engine.core.profile.dump()
        stopped = EngineDeadError("the engine was shut down.")
        self._fail(None, stopped)
        self._fail_calls(stopped)  # their answers will never come

    # -- requests ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestStream]:
        """Queue a request and yield its stream; leaving the block unfinished aborts it.

        Request ids must not contain "#" (the engine's child-sample separator).
        """
        self.check_health()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use.")
        self.check_queue_room(params.num_samples)
        stream = RequestStream(request_id, len(prompt_token_ids))
        requests = self.facts.prepare(
            self.processor, request_id, prompt_token_ids, params, cache_salt, lora_request,
            stream.arrival_time,
        )  # fmt: skip
        self._streams[request_id] = stream
        self.waiting_limit.num_sent_adds += len(requests)
        self.client.send(AddRequests([to_wire(r) for r in requests]))
        try:
            yield stream
        finally:
            if not stream.finished:
                # Cancelled, disconnected or failed: the core frees its KV blocks before
                # its next step.
                self._abort(request_id)
                stream.finished = True
                if self.observer is not None:
                    self.observer.on_finish(stream, "abort")
            self._streams.pop(request_id, None)

    def _abort(self, request_id: str) -> None:
        req_ids = self.processor.abort_request(request_id)
        if req_ids and self.is_running:
            self.client.send(AbortRequests(req_ids))

    async def embed(self, prompts: list[list[int]]) -> list[EmbeddingRequestOutput]:
        """Pooled embeddings (the engine's default pooling) of validated prompts, computed
        between two steps."""
        self.check_health()
        require_runner(self.runner_type, "pooling")
        result: list[EmbeddingRequestOutput] = await self._call("embed", list(prompts))
        return result

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register an adapter between two steps; False if its id is registered already.
        ValueError: it does not fit the model; FileNotFoundError: no adapter at its path."""
        self.check_health()
        if self.engine is not None:  # in-process: read the folder off the event loop first
            adapter = await asyncio.to_thread(self.engine.load_lora, lora_request)
            result: bool = await self._call("add_lora", lora_request, adapter)
            return result
        result = await self._call("add_lora", lora_request)
        return result

    def add_lora_at_startup(self, lora_request: LoRARequest) -> bool:
        """Register an adapter before `start` (errors end start-up)."""
        result: bool = self.client.call_sync("add_lora", lora_request)
        return result

    async def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter; requests already running with it finish with it."""
        self.check_health()
        result: bool = await self._call("remove_lora", lora_id)
        return result

    async def _call(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self.client.send(UtilityCall(call_id, method, dumps(args)))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def check_queue_room(self, num_new: int) -> None:
        """Raises QueueFullError if `num_new` more requests would pass the waiting limit."""
        self.waiting_limit.check_room(self._stats, num_new)

    # -- events from the core (on the event loop) --------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            self._on_step(event)
        elif isinstance(event, UtilityResult):
            self._on_result(event)
        elif isinstance(event, RequestsFailed):
            limit = self.waiting_limit
            limit.num_applied_adds = max(limit.num_applied_adds, event.num_applied_adds)
            error: BaseException = loads(event.error)
            self._fail_children(event.req_ids, error)
        elif isinstance(event, CoreDead):
            self._on_death(event.reason)

    def _on_step(self, event: StepOutputs) -> None:
        prof = self.profile
        prof.start()
        self._stats = event.stats
        num_new = sum(len(u.new_token_ids) for u in event.updates)  # type: ignore[misc,attr-defined]
        self.stat_logger.observe(event.stats, num_new)
        self.waiting_limit.num_applied_adds = event.num_applied_adds
        for req_id in event.scheduled_ids:
            stream = self._streams.get(req_id.partition("#")[0])
            if stream is not None and stream.scheduled_time is None:
                stream.scheduled_time = event.step_start
        if event.error is not None:
            self._fail_children(
                event.failed_ids, EngineStepError(f"generation failed: {event.error}")
            )
        processed = self.processor.process(event.updates)
        prof.lap("process")
        if processed.stopped:
            self.client.send(AbortRequests(processed.stopped, stopped=True))
        now = time.monotonic()
        for output in processed.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None or stream.finished:
                continue  # aborted while the step ran
            first = stream.first_token_time is None
            stream.deliver(output, now, self.observer)
            if first and prof.enabled and stream.scheduled_time is not None:
                prof.add("arrival_to_step", stream.scheduled_time - stream.arrival_time)
                prof.add("step_to_first_token", now - stream.scheduled_time)
        prof.lap("deliver")

    def _on_result(self, event: UtilityResult) -> None:
        future = self._calls.get(event.call_id)
        if future is None or future.done():  # the caller gave up (cancelled)
            return
        value = loads(event.result)
        if event.failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    def _on_death(self, reason: str) -> None:
        if self._dead is not None:
            return
        logger.error("the engine core died: %s", reason)
        self._dead = reason
        failed = EngineFailedError(f"the engine failed and the server is restarting: {reason}")
        self._fail(None, failed)
        self._fail_calls(failed)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _fail_children(self, req_ids: list[str], error: BaseException) -> None:
        """End the user requests these scheduler requests belong to with `error` (their
        other samples are aborted in the core)."""
        parents = sorted({r.partition("#")[0] for r in req_ids})
        for request_id in parents:
            others = [r for r in self.processor.abort_request(request_id) if r not in req_ids]
            if others:
                self.client.send(AbortRequests(others))
        self._fail(parents, error)

    def _fail_calls(self, error: BaseException) -> None:
        """End every utility call still waiting for the core's answer with `error`."""
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)

    def _fail(self, request_ids: list[str] | None, error: BaseException) -> None:
        """End streams (None: all) with an error."""
        for request_id in list(self._streams) if request_ids is None else request_ids:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.finished:
                stream.queue.put_nowait(error)
