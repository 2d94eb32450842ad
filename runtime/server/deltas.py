"""Cumulative engine outputs -> what is new since the last chunk, per choice."""

from __future__ import annotations

from dataclasses import dataclass

from pinnace.runtime.outputs import CompletionOutput


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Remembers how much text and how many tokens each choice has been sent.

    CompletionOutput.text is cumulative and, while running, holds back what could begin a
    stop string, so the new text is always `text[len(sent):]`. Tokens whose text is still
    held back travel (with their logprobs) in the chunk that finally shows it.
    """

    def __init__(self) -> None:
        self._text: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._finished: set[int] = set()

    def delta(self, key: int, output: CompletionOutput) -> Delta | None:
        """None when there is nothing to send for this choice yet (or any more)."""
        if key in self._finished:
            return None
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
            text=text,
            token_ids=output.token_ids[sent_tokens:],
            logprobs=logprobs,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )

    @property
    def num_tokens(self) -> int:
        return sum(self._tokens.values())
