"""Cumulative engine outputs -> what is new since the last chunk, per choice: the one
streaming helper of OpenAI completions and chat and KServe V2 generate_stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

from pinnace.runtime.outputs import CompletionOutput, RequestOutput
from pinnace.runtime.server.serving import EngineRequest, ServerContext


@dataclass
class Delta:
    index: int  # the choice's sample index within its request (CompletionOutput.index)
    text: str
    full_text: str  # the choice's text so far, this delta included
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    is_first: bool  # the choice's first delta (vLLM sends prompt logprobs with it)


class DeltaTracker:
    """Remembers how much text and how many tokens each choice has been sent.

    CompletionOutput.text is cumulative and, while running, holds back what could begin a
    stop string, so the new text is always `text[len(sent):]`. Tokens whose text is still
    held back travel (with their logprobs) in the chunk that finally shows it.
    """

    def __init__(self) -> None:
        self._text: dict[Hashable, int] = {}
        self._tokens: dict[Hashable, int] = {}
        self._finished: set[Hashable] = set()

    def delta(self, key: Hashable, output: CompletionOutput) -> Delta | None:
        """None when there is nothing to send for this choice yet (or any more)."""
        if key in self._finished:
            return None
        is_first = key not in self._text
        sent_text = self._text.get(key, 0)
        sent_tokens = self._tokens.get(key, 0)
        text = output.text[sent_text:]
        if not text and not output.finished:
            return None
        self._text[key] = max(sent_text, len(output.text))
        self._tokens[key] = len(output.token_ids)
        if output.finished:
            self._finished.add(key)
        logprobs = None if output.logprobs is None else output.logprobs[sent_tokens:]
        return Delta(
            index=output.index,
            text=text,
            full_text=output.text,
            token_ids=output.token_ids[sent_tokens:],
            logprobs=logprobs,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
            is_first=is_first,
        )

    @property
    def num_tokens(self) -> int:
        return sum(self._tokens.values())


@contextlib.asynccontextmanager
async def stream_deltas(
    ctx: ServerContext, requests: list[EngineRequest], tracker: DeltaTracker
) -> AsyncIterator[AsyncIterator[tuple[int, RequestOutput, Delta]]]:
    """Submit requests; yields their deltas as they come, as (request index, the request's
    whole output this step, one choice's delta). Leaving the block early aborts them all."""
    async with ctx.generate_all(requests) as outputs:

        async def deltas() -> AsyncIterator[tuple[int, RequestOutput, Delta]]:
            async for index, output in outputs:
                for out in output.outputs:
                    delta = tracker.delta((index, out.index), out)
                    if delta is not None:
                        yield index, output, delta

        yield deltas()
