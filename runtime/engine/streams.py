"""A served request's stream of outputs, its timestamps, and the engine's errors."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from pinnace.runtime.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine core stopped and cannot serve any more requests."""


class EngineFailedError(EngineDeadError):
    """The engine core died of an error (not a shutdown): the server must be restarted."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in it were aborted, the engine goes on serving."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class RequestObserver(Protocol):
    """Told about every delivered output and every finished or aborted request."""

    def on_output(self, stream: RequestStream, output: RequestOutput, num_new_tokens: int) -> None:
        pass

    def on_finish(self, stream: RequestStream, finish_reason: str) -> None:
        pass


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

    def deliver(self, output: RequestOutput, now: float, observer: RequestObserver | None) -> None:
        """Queue one step's output, with its token timestamps."""
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        num_new = num_tokens - self.num_generation_tokens
        if num_new > 0:
            self.previous_token_time = self.last_token_time
            self.first_token_time = self.first_token_time or now
            self.last_token_time = now
            self.num_generation_tokens = num_tokens
        self.last_output = output
        if observer is not None:
            observer.on_output(self, output, num_new)
        self.queue.put_nowait(output)
        if output.finished:
            self.finished = True
            if observer is not None:
                reason = output.outputs[0].finish_reason if output.outputs else None
                observer.on_finish(self, reason or "stop")
