"""What every route needs: the served model, prompt checks, engine calls and their errors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import Response

from pinnace.runtime.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineFailedError,
    EngineStepError,
    QueueFullError,
    RequestStream,
)
from pinnace.runtime.engine.grammar_compiler import check_constraint
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import RequestOutput
from pinnace.runtime.sampling_params import ParameterError, SamplingParams
from pinnace.runtime.server.adapters import ServedAdapters
from pinnace.runtime.server.errors import APIError, bad_request, error_body
from pinnace.runtime.server.request_limits import check_request_cost
from pinnace.runtime.server.tools import ToolSettings

T = TypeVar("T")

# The one version of each model KServe V2 paths may name (`<model>/versions/1`).
MODEL_VERSION = "1"
# Seconds a client told "busy" (503) should wait before retrying.
RETRY_AFTER_S = 1


# Requests with bodies up to this size are tokenized (and templated) on the event loop:
# a few hundred characters take tens of microseconds, less than the two thread hops of
# asyncio.to_thread, which on a busy machine cost milliseconds of a request's time to its
# first token. Larger ones go to a worker thread so the loop keeps serving streams.
INLINE_PREPARE_BYTES = 2048


async def prepare_off_loop(raw: Request, prepare: Callable[[], T]) -> T:
    """`prepare()` (tokenizing a request) on the event loop for a small body, else in a
    worker thread; a body of unknown size counts as large."""
    size = raw.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) <= INLINE_PREPARE_BYTES:
        return prepare()
    return await asyncio.to_thread(prepare)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None = None


class ServerContext:
    """The served model, its LoRA adapters and its engine, shared by every route."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        model_names: list[str],
        model_path: str,
        enable_lora: bool = False,
        tool_settings: ToolSettings | None = None,
    ) -> None:
        if not model_names:
            raise ValueError("at least one served model name is needed.")
        self.engine = engine
        self.model_names = model_names
        self.model_path = model_path
        self.adapters = ServedAdapters(engine, model_names, enable_lora)
        self.tool_settings = tool_settings or ToolSettings()

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def resolve_model(self, name: str | None, version: str | None = None) -> str:
        """The served name a request runs as (a base model's name or an adapter's; empty:
        the first base name). The one check of OpenAI, KServe V1 and V2 (REST and gRPC)
        routes: 404 naming `model` for a model, or a KServe version other than
        MODEL_VERSION, that this server does not serve."""
        if not name:
            return self.model_name
        if name not in self.model_names and self.adapters.get(name) is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        if version is not None and version != MODEL_VERSION:
            message = f"The model `{name}` has no version {version!r}; it serves {MODEL_VERSION!r}."
            raise APIError(404, message, "model")
        return name

    def served(self) -> list[str]:
        """Every name a request may use: the base model's names, then the adapters'."""
        return [*self.model_names, *self.adapters.by_name]

    def lora_for(self, model: str) -> LoRARequest | None:
        """The adapter a resolved model name runs with (None: the base model)."""
        return self.adapters.get(model)

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def prepare(
        self, prompt: str | list[int], params: SamplingParams, param: str = "prompt"
    ) -> list[int]:
        """Tokenize and check one prompt against the context length; 400 if it can't run.
        Blocking (the tokenizer): routes call it from a worker thread."""
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), param)
        ids = self.engine.tokenize(prompt)
        try:
            max_tokens = self.engine.validate(ids, params)
        except ParameterError as exc:
            raise bad_request(str(exc), exc.param) from exc
        except ValueError as exc:  # the prompt itself: empty, out of vocabulary, too long
            raise bad_request(str(exc), param) from exc
        check_request_cost(params, max_tokens, self.engine.max_model_len)
        return ids

    async def compile_grammar(self, params: SamplingParams, param: str) -> None:
        """400 if the request's output constraint won't compile. Only parsed here (in a
        worker thread: a long regex or schema may take a while): the engine core compiles
        it, off its step."""
        spec = params.structured_outputs
        if spec is None:
            return
        try:
            await asyncio.to_thread(check_constraint, spec)
        except ValueError as exc:
            raise bad_request(f"{param}: {exc}", param) from exc

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """No prompt longer than this can fit max_model_len: no token is longer than the
        vocabulary's longest (byte-level and SentencePiece pieces are at least as long as
        the text they decode to)."""
        longest = max((len(t) for t in self.engine.tokenizer.get_vocab()), default=1)
        return self.engine.max_model_len * max(1, longest)

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """A 400 for text too long to fit, before spending time tokenizing it."""
        if num_chars > self.max_prompt_chars:
            raise bad_request(
                f"the prompt has {num_chars} characters, more than the "
                f"{self.engine.max_model_len}-token context can hold; shorten it.",
                param,
            )

    def check_room(self, num_requests: int) -> None:
        with engine_errors():
            self.engine.check_queue_room(num_requests)

    async def collect(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Run requests to completion; returns their final outputs in order."""
        finals: list[RequestOutput | None] = [None] * len(requests)
        async with self.generate_all(requests) as outputs:
            async for index, output in outputs:
                finals[index] = output
        return [f for f in finals if f is not None]

    @contextlib.asynccontextmanager
    async def generate_all(
        self, requests: list[EngineRequest]
    ) -> AsyncIterator[AsyncIterator[tuple[int, RequestOutput]]]:
        """Submit requests; yields their outputs interleaved as (index, output).

        Leaving the block early (error, cancellation, disconnect) aborts all of them.
        """
        with engine_errors():
            async with contextlib.AsyncExitStack() as stack:
                streams = [
                    await stack.enter_async_context(
                        self.engine.generate(
                            r.request_id,
                            r.prompt_token_ids,
                            r.params,
                            lora_request=r.lora_request,
                        )
                    )
                    for r in requests
                ]
                merged = _merge(streams)
                try:
                    yield merged
                finally:
                    await merged.aclose()


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Engine exceptions -> HTTP errors."""
    try:
        yield
    except QueueFullError as exc:
        raise APIError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    except EngineFailedError as exc:  # a crash, not a shutdown: loud, and the pod restarts
        raise APIError(500, str(exc)) from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from exc
    except EngineStepError as exc:
        raise APIError(500, str(exc)) from exc
    except ParameterError as exc:
        raise bad_request(str(exc), exc.param) from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    except FileNotFoundError as exc:  # an adapter's folder vanished after it was loaded
        raise APIError(404, str(exc)) from exc


async def _merge(streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                merged.put_nowait((index, output))
            merged.put_nowait((index, None))
        except Exception as exc:
            merged.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody is listening; nginx's "client closed"


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def server_version() -> str:
    try:
        return importlib.metadata.version("pinnace")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
        return "0+unknown"


def sse(data: Any) -> str:
    """One server-sent event; `data` is a JSON string or a JSON-able value."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(path: str, exc: APIError) -> str:
    return sse(error_body(path, exc.status, exc.message, exc.param))
