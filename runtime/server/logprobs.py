"""Engine logprobs ({token_id: logprob} per output token) in OpenAI's two shapes."""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerBase

from pinnace.runtime.core.outputs import Logprob
from pinnace.runtime.outputs import RequestOutput
from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.server.openai_protocol import (
    ChatChoiceLogprobs,
    ChatLogprob,
    CompletionLogprobs,
    PromptLogprob,
    TopLogprob,
)

# JSON has no -inf: vLLM's stand-in for a token that cannot be sampled.
_MIN_LOGPROB = -9999.0


def _decode(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens. The engine adds the sampled token to the top-k; when it
    is outside the top-k it is the least likely entry, so sorting recovers the top-k."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: list[int],
    entries: list[dict[int, float]],
    text_offset: int,
) -> CompletionLogprobs:
    """`/v1/completions` shape; top_logprobs holds the top-k plus the sampled token."""
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(token_ids, entries, strict=False):
        token = _decode(tokenizer, token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_finite(entry.get(token_id, _MIN_LOGPROB)))
        out.top_logprobs.append(
            {_decode(tokenizer, i): _finite(lp) for i, lp in _top(entry, len(entry))}
        )
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: list[int],
    entries: list[dict[int, float]],
    num_top: int,
) -> ChatChoiceLogprobs:
    """`/v1/chat/completions` shape: each token with its `num_top` best alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        token = _decode(tokenizer, token_id)
        top = [_top_logprob(tokenizer, i, lp) for i, lp in _top(entry, num_top)]
        content.append(
            ChatLogprob(
                token=token,
                logprob=_finite(entry.get(token_id, _MIN_LOGPROB)),
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return ChatChoiceLogprobs(content=content)


def _top_logprob(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> TopLogprob:
    token = _decode(tokenizer, token_id)
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode()))


def prompt_logprobs(
    tokenizer: PreTrainedTokenizerBase, entries: list[dict[int, Logprob] | None]
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `choices[i].prompt_logprobs`: None for the first prompt token, then per
    token {token_id: {logprob, rank, decoded_token}}, the prompt token and the top-k."""
    out: list[dict[int, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        out.append(
            {
                token_id: PromptLogprob(
                    logprob=_finite(value.logprob),
                    rank=value.rank,
                    decoded_token=_decode(tokenizer, token_id),
                )
                for token_id, value in sorted(entry.items(), key=lambda kv: kv[1].rank)
            }
        )
    return out


def prompt_logprobs_of(
    tokenizer: PreTrainedTokenizerBase, params: SamplingParams, output: RequestOutput
) -> list[dict[int, PromptLogprob] | None] | None:
    """The response's prompt_logprobs when the request asked for them (completions and chat)."""
    if params.prompt_logprobs is None or output.prompt_logprobs is None:
        return None
    return prompt_logprobs(tokenizer, output.prompt_logprobs)
