"""AsyncLLMEngine: one background thread drives the engine; each request gets a stream.

LLMEngine is not thread-safe, so every engine call happens on one dedicated thread:

    event loop (HTTP handlers)            engine thread
    --------------------------            -------------
    generate() -> inbox.put(Add) ------>  drain inbox: add_request / abort_request
                                          step() -> outputs
    stream.queue  <-- call_soon_threadsafe(deliver, outputs)
    leaving `async with` unfinished
               -> inbox.put(Abort) ---->  abort_request: KV blocks freed before next step
    add_lora() reads the folder in a worker thread, then
               -> inbox.put(Call) ----->  add_lora / remove_lora between two steps

Torch releases the GIL during compute, so the event loop keeps serving while a step runs.
Tokenizing and validating (`validate`) only read the tokenizer and the config, so the
event loop may call them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed and cannot serve any more requests."""


class EngineFailedError(EngineDeadError):
    """The engine thread died of an error (not a shutdown): the server must be restarted."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in it were aborted, the engine goes on serving."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class RequestStream:
    """One request's outputs, in order, plus the timestamps metrics need (monotonic s)."""

    request_id: str
    num_prompt_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    previous_token_time: float | None = None  # the token step before the last one
    num_generation_tokens: int = 0
    finished: bool = False
    last_output: RequestOutput | None = None
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class RequestObserver(Protocol):
    """Told about every delivered output and every finished or aborted request."""

    def on_output(self, stream: RequestStream, output: RequestOutput, num_new_tokens: int) -> None:
        pass

    def on_finish(self, stream: RequestStream, finish_reason: str) -> None:
        pass


@dataclass
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run `fn(engine)` on the engine thread; its result or exception resolves `future`."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any]


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop


class AsyncLLMEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be at least 1, got {max_waiting_requests}."
            )
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()
        self._dead: BaseException | None = None
        # Called on the event loop with the error when the engine thread dies (the server
        # stops and exits non-zero: lifecycle.py).
        self.on_failure: Callable[[str], None] | None = None
        # Each counter is written by one thread only; their difference is the adds in flight.
        self._num_sent_adds = 0
        self._num_applied_adds = 0

    # -- read-only views, safe from any thread ----------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.engine.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raises ValueError with a user-facing message; returns the resolved max_tokens."""
        return self.engine.validate(prompt_token_ids, params)

    def stats(self) -> SchedulerStats:
        """Scheduler counters as of the engine thread's last step or command."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineFailedError(f"the engine failed: {self._dead!r}")
        if not self.is_running:
            raise EngineDeadError("the engine is not running.")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs are delivered on `loop` (default: the running one)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started.")
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pinnace-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(_Stop())
        self._thread.join(timeout)
        self._thread = None

    # -- requests (event-loop side) ----------------------------------------------------------

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
        self._streams[request_id] = stream
        self._num_sent_adds += params.num_samples
        self._inbox.put(_Add(stream, prompt_token_ids, params, cache_salt, lora_request))
        try:
            yield stream
        finally:
            if not stream.finished:
                # Cancelled, disconnected or failed: free its KV blocks now.
                self._inbox.put(_Abort(request_id))
                stream.finished = True
                if self.observer is not None:
                    self.observer.on_finish(stream, "abort")
            self._streams.pop(request_id, None)

    async def embed(self, prompts: list[list[int]]) -> list[EmbeddingRequestOutput]:
        """Pooled embeddings (the engine's default pooling), computed between two steps."""
        self.check_health()
        result: list[EmbeddingRequestOutput] = await self._call(
            lambda engine: engine.embed(list(prompts))
        )
        return result

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter off the event loop, then register it between two
        steps; False if its id is registered already. ValueError: it does not fit the
        model; FileNotFoundError: no adapter at its path."""
        self.check_health()
        adapter = await asyncio.to_thread(self.engine.load_lora, lora_request)
        result: bool = await self._call(lambda engine: engine.add_lora(lora_request, adapter))
        return result

    async def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter; requests already running with it finish with it."""
        self.check_health()
        result: bool = await self._call(lambda engine: engine.remove_lora(lora_id))
        return result

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Call(fn, future))
        return await future

    def check_queue_room(self, num_new: int) -> None:
        """Raises QueueFullError if `num_new` more requests would pass the waiting limit."""
        if self.max_waiting_requests is None:
            return
        waiting = self._projected_waiting()
        if waiting + num_new > self.max_waiting_requests:
            raise QueueFullError(
                f"the server is busy: {waiting} requests are waiting "
                f"(max_waiting_requests={self.max_waiting_requests}); retry later."
            )

    def _projected_waiting(self) -> int:
        """Waiting requests once the adds still in the inbox are applied: those beyond the
        free batch slots will wait (while some wait already, no slot is free: FCFS)."""
        stats = self._stats
        in_flight = self._num_sent_adds - self._num_applied_adds
        free = 0
        if stats.num_waiting_reqs == 0:
            free = max(0, self.engine.config.max_num_seqs - stats.num_running_reqs)
        return stats.num_waiting_reqs + max(0, in_flight - free)

    def _deliver(
        self, outputs: list[RequestOutput], scheduled: list[str], step_start: float
    ) -> None:
        """Runs on the event loop: route one step's outputs to their streams."""
        now = time.monotonic()
        for request_id in scheduled:
            stream = self._streams.get(request_id)
            if stream is not None and stream.scheduled_time is None:
                stream.scheduled_time = step_start
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None or stream.finished:
                continue  # aborted while the step ran
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            num_new = num_tokens - stream.num_generation_tokens
            if num_new > 0:
                stream.previous_token_time = stream.last_token_time
                stream.first_token_time = stream.first_token_time or now
                stream.last_token_time = now
                stream.num_generation_tokens = num_tokens
            stream.last_output = output
            if self.observer is not None:
                self.observer.on_output(stream, output, num_new)
            stream.queue.put_nowait(output)
            if output.finished:
                stream.finished = True
                if self.observer is not None:
                    reason = output.outputs[0].finish_reason if output.outputs else None
                    self.observer.on_finish(stream, reason or "stop")

    def _fail(self, request_ids: list[str] | None, error: BaseException) -> None:
        """Runs on the event loop: end streams (None: all) with an error; already aborted."""
        for request_id in list(self._streams) if request_ids is None else request_ids:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.finished:
                stream.queue.put_nowait(error)

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        active: set[str] = set()  # requests the engine holds, engine-thread side
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(active, block=idle):
                    self.engine.abort_request(sorted(active))
                    stopped = EngineDeadError("the engine was shut down.")
                    self._call_soon(self._fail, None, stopped)
                    return
                if self.engine.has_unfinished_requests():
                    self._step(active)
                else:
                    active.clear()
                self._stats = self.engine.stats()
        except BaseException as exc:  # a bug in the engine itself (tests inject one)
            logger.exception("engine thread died")
            self._dead = exc
            failed = EngineFailedError(f"the engine failed and the server is restarting: {exc!r}")
            self._call_soon(self._fail, None, failed)
            if self.on_failure is not None:
                self._call_soon(self.on_failure, repr(exc))

    def _apply_commands(self, active: set[str], block: bool) -> bool:
        """Drain the inbox (waiting for one command if idle); False on stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Abort):
                self.engine.abort_request([command.request_id])
                active.discard(command.request_id)
                continue
            if isinstance(command, _Call):
                self._run_call(command)
                continue
            self._add(command, active)

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.fn(self.engine)
        except Exception as exc:
            self._call_soon(_resolve, call.future, None, exc)
        else:
            self._call_soon(_resolve, call.future, result, None)

    def _add(self, command: _Add, active: set[str]) -> None:
        stream = command.stream
        try:
            self.engine.add_request(
                stream.request_id,
                command.prompt_token_ids,
                command.params,
                command.cache_salt,
                command.lora_request,
            )
            active.add(stream.request_id)
        except (ValueError, FileNotFoundError) as exc:  # e.g. an adapter folder gone
            self._call_soon(self._fail, [stream.request_id], exc)
        finally:
            self._num_applied_adds += command.params.num_samples

    def _step(self, active: set[str]) -> None:
        start = time.monotonic()
        unscheduled = self._waiting_ids()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; aborting its %d requests", len(active))
            ids = sorted(active)
            self.engine.abort_request(ids)
            active.clear()
            self._call_soon(self._fail, ids, EngineStepError(f"generation failed: {exc!r}"))
            return
        scheduled = sorted(unscheduled - self._waiting_ids())
        for output in outputs:
            if output.finished:
                active.discard(output.request_id)
        self._call_soon(self._deliver, outputs, scheduled, start)

    def _waiting_ids(self) -> set[str]:
        # Scheduler ids of the n samples of request R are "R#i" (R itself when n == 1).
        return {r.req_id.partition("#")[0] for r in self.engine.scheduler.waiting}

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
