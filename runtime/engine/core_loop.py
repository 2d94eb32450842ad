"""CoreLoop: apply the front end's commands to an engine core between steps, and step it.

The same loop body serves the engine-core process (core_proc.py, commands off a socket)
and the in-process engine thread (core_client.InprocClient, commands off a queue):

    commands ──> handle(): add / abort / utility call (between two steps)
    finish_background(): what a worker thread prepared (a grammar, an adapter read from
                         its folder) joins the core
    step() ──> one StepOutputs event per step, every request's new tokens in it
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from pinnace.runtime.core.outputs import RequestUpdate, SchedulerStats
from pinnace.runtime.engine.core_messages import (
    AbortRequests,
    AddRequests,
    Command,
    Event,
    RequestsFailed,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    dumps,
    from_wire,
    loads,
)
from pinnace.runtime.engine.engine_core import CoreRequest
from pinnace.runtime.engine.grammar_compiler import GrammarCompiler
from pinnace.runtime.engine.step_profile import NullProfile
from pinnace.runtime.executor.executor import WorkerDiedError
from pinnace.runtime.lora.adapter import LoRAAdapter
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.request import RequestStatus

logger = logging.getLogger(__name__)

# Core methods the front end may call between steps.
UTILITY_METHODS = frozenset(
    {"add_lora", "remove_lora", "list_loras", "embed", "reset_prefix_cache"}
)


class Core(Protocol):
    """What the loop needs of a core (EngineCore; LLMEngine's core in a thread)."""

    def add_request(self, request: CoreRequest) -> None: ...
    def finish_requests(self, req_ids: list[str], status: RequestStatus = ...) -> None: ...
    def step(self) -> list[RequestUpdate]: ...
    def has_unfinished_requests(self) -> bool: ...
    def waiting_ids(self) -> set[str]: ...
    def stats(self) -> SchedulerStats: ...
    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter: ...
    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool: ...

    @property
    def grammar(self) -> GrammarCompiler: ...

    profile: NullProfile


class CoreLoop:
    def __init__(self, core: Core, emit: Callable[[Event], None]) -> None:
        self.core = core
        self.emit = emit
        self.active: set[str] = set()  # scheduler ids the core holds
        self.num_applied_adds = 0
        # Requests whose output constraint is compiling (off the step, in a worker thread):
        # they join the scheduler once it is ready, so no step waits for a compile.
        self._compiling: dict[str, tuple[Future[Any], CoreRequest]] = {}
        # add_lora calls whose adapter is being read from its folder (same thread): the
        # adapter is registered between two steps once read, then the call is answered.
        self._loading: list[tuple[Future[LoRAAdapter], UtilityCall, LoRARequest]] = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="pinnace-core-worker")

    @property
    def has_work(self) -> bool:
        return self.core.has_unfinished_requests() or bool(self._compiling) or bool(self._loading)

    def handle(self, command: Command) -> bool:
        """Apply one command; False on shutdown (every request aborted then)."""
        if isinstance(command, Shutdown):
            self.core.finish_requests(sorted(self.active))
            self.active.clear()
            return False
        if isinstance(command, AbortRequests):
            stopped = RequestStatus.FINISHED_STOPPED
            status = stopped if command.stopped else RequestStatus.FINISHED_ABORTED
            self.core.finish_requests(command.req_ids, status)
            self.active.difference_update(command.req_ids)
            for req_id in command.req_ids:
                self._compiling.pop(req_id, None)
        elif isinstance(command, UtilityCall):
            self._call(command)
        elif isinstance(command, AddRequests):
            self._add(command)
        return True

    def _add(self, command: AddRequests) -> None:
        now = time.monotonic()
        for wire in command.requests:
            self.num_applied_adds += 1
            self.core.profile.add("arrival_to_core", now - wire.arrival_time)
            request = from_wire(wire)
            spec = request.params.structured_outputs
            if spec is not None:
                future = self._worker.submit(self.core.grammar.compile, spec)
                self._compiling[request.req_id] = (future, request)
            else:
                self._admit(request, None)

    def finish_background(self) -> None:
        """What the worker thread finished joins the core: requests whose grammar compiled
        (a failed one is refused), adapters read from their folder (then registered)."""
        loading, self._loading = self._loading, []
        for future, call, lora_request in loading:
            if not future.done():
                self._loading.append((future, call, lora_request))
                continue
            self._answer(call, functools.partial(self._register, lora_request, future))
        for req_id, (future, request) in list(self._compiling.items()):
            if future.done():
                del self._compiling[req_id]
                self._admit(request, future.exception())

    def _admit(self, request: CoreRequest, error: BaseException | None) -> None:
        try:
            if error is not None:
                raise error
            self.core.add_request(request)
            self.active.add(request.req_id)
        except (ValueError, FileNotFoundError) as exc:  # a bad grammar, an adapter gone
            self.emit(RequestsFailed([request.req_id], dumps(exc), self.num_applied_adds))

    def _register(self, lora_request: LoRARequest, loaded: Future[LoRAAdapter]) -> bool:
        return self.core.add_lora(lora_request, loaded.result())  # raises what loading did

    def _call(self, call: UtilityCall) -> None:
        if call.method == "add_lora":
            args: tuple[Any, ...] = loads(call.args)
            if len(args) == 1:  # no adapter read yet: read it off the step loop
                (lora_request,) = args
                future = self._worker.submit(self.core.load_lora, lora_request)
                self._loading.append((future, call, lora_request))
                return
        self._answer(call, lambda: self._run(call))

    def _run(self, call: UtilityCall) -> Any:
        if call.method not in UTILITY_METHODS:
            raise ValueError(f"unknown engine call {call.method!r}.")
        return getattr(self.core, call.method)(*loads(call.args))

    def _answer(self, call: UtilityCall, run: Callable[[], Any]) -> None:
        """Emit `run()`'s result, or the exception it raised, as the call's answer."""
        try:
            result = run()
        except Exception as exc:
            self.emit(UtilityResult(call.call_id, dumps(exc), failed=True))
        else:
            self.emit(UtilityResult(call.call_id, dumps(result)))

    def report_idle(self) -> None:
        """Commands left the core without work (say, the last requests were aborted): an
        empty step's event, so the front end's counters (KV use, queue) catch up."""
        stats = self.core.stats()
        self.emit(StepOutputs([], stats, time.monotonic(), [], self.num_applied_adds))

    def step(self) -> None:
        """One engine step; its outputs (or the failure of its requests) as one event.

        WorkerDiedError (a rank gone, or a multi-rank step that failed part-way) propagates:
        the core cannot step any more, so whoever runs the loop reports it dead."""
        start = time.monotonic()
        waiting = self.core.waiting_ids()
        try:
            updates = self.core.step()
        except WorkerDiedError:  # the model's ranks cannot step any more: the core dies
            raise
        except Exception as exc:
            logger.exception("engine step failed; aborting its %d requests", len(self.active))
            failed = sorted(self.active)
            self.core.finish_requests(failed)
            self.active.clear()
            self.emit(
                StepOutputs(
                    [], self.core.stats(), start, [], self.num_applied_adds, failed, repr(exc)
                )
            )
            return
        for update in updates:
            if update.finish_reason is not None:
                self.active.discard(update.req_id)
        scheduled = sorted(waiting - self.core.waiting_ids())
        self.emit(StepOutputs(updates, self.core.stats(), start, scheduled, self.num_applied_adds))
