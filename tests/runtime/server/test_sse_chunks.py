"""ChunkEnvelope: a stream's chunk is the same bytes as dumping the whole response model."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from pinnace.runtime.server.openai_protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatLogprob,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    TopLogprob,
)
from pinnace.runtime.server.serving import sse
from pinnace.runtime.server.sse_chunks import ChunkEnvelope

# Text a chunk may carry: quotes, backslashes, control characters, non-ASCII, and what
# looks like the envelope's own JSON.
TEXTS = ["", " hello", 'say "hi"\\n', "\n\t\x00\x1f\x7f", "naïve 😀 世界 \u2028", '"choices":[]']


def _same(response: BaseModel, choice: BaseModel) -> None:
    envelope = ChunkEnvelope(response.model_copy(update={"choices": []}))
    whole = response.model_copy(update={"choices": [choice]})
    assert envelope.chunk(choice) == sse(whole.model_dump_json(exclude_none=True))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model", ["bench", 'odd "name" \\ 😀', '"choices":[]'])
def test_completion_chunks(text: str, model: str) -> None:
    response = CompletionResponse(id=f"cmpl-{text}", created=1, model=model, choices=[])
    logprobs = CompletionLogprobs(
        text_offset=[0], token_logprobs=[-0.5], tokens=[text], top_logprobs=[{text: -0.5}]
    )
    for choice in (
        CompletionChoice(index=0, text=text),
        CompletionChoice(index=3, text=text, finish_reason="stop", stop_reason=text),
        CompletionChoice(index=1, text=text, finish_reason="length", stop_reason=7),
        CompletionChoice(index=0, text=text, logprobs=logprobs),
    ):
        _same(response, choice)


@pytest.mark.parametrize("text", TEXTS)
def test_chat_chunks(text: str) -> None:
    response = ChatCompletionChunk(id="chatcmpl-1", created=2, model="m", choices=[])
    top = TopLogprob(token=text, logprob=-1.0, bytes=list(text.encode()))
    entry = ChatLogprob(token=text, logprob=-1.0, top_logprobs=[top])
    logprobs = ChatChoiceLogprobs(content=[entry])
    call = DeltaToolCall(index=0, id="call_1", type="function",
                         function=DeltaFunctionCall(name="f", arguments=text))  # fmt: skip
    for choice in (
        ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content="")),
        ChatStreamChoice(index=0, delta=DeltaMessage(content=text), logprobs=logprobs),
        ChatStreamChoice(
            index=2, delta=DeltaMessage(tool_calls=[call]), finish_reason="tool_calls"
        ),
    ):
        _same(response, choice)


def test_a_response_with_choices_or_usage_is_not_an_envelope() -> None:
    full = CompletionResponse(id="x", model="m", choices=[CompletionChoice(index=0, text="")])
    with pytest.raises(ValueError, match="empty choices"):
        ChunkEnvelope(full)
