"""OpenAI request -> SamplingParams, rejecting by name what the engine can't do."""

from __future__ import annotations

from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.server.errors import bad_request, unsupported
from pinnace.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)


def check_common(req: SamplingFields) -> None:
    if req.presence_penalty:
        raise unsupported("presence_penalty", "only 0 is accepted")
    if req.frequency_penalty:
        raise unsupported("frequency_penalty", "only 0 is accepted")
    if req.repetition_penalty is not None and req.repetition_penalty != 1.0:
        raise unsupported("repetition_penalty", "only 1 is accepted")
    if req.min_p:
        raise unsupported("min_p", "only 0 is accepted")
    if req.logit_bias:
        raise unsupported("logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.best_of is not None and req.best_of != req.n:
        raise unsupported("best_of", "only best_of equal to n is accepted")
    if req.suffix:
        raise unsupported("suffix")
    if req.echo and req.logprobs is not None:
        raise unsupported("logprobs", "with echo it needs prompt logprobs")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.tools:
        raise unsupported("tools")
    if req.tool_choice not in (None, "none"):
        raise unsupported("tool_choice")
    if req.functions:
        raise unsupported("functions")
    if req.function_call not in (None, "none"):
        raise unsupported("function_call")
    if req.parallel_tool_calls:
        raise unsupported("parallel_tool_calls")
    if req.response_format is not None:
        kind = req.response_format.get("type")
        if kind != "text":
            raise unsupported("response_format", f"type {kind!r}; only 'text' is accepted")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
    if not req.messages:
        raise bad_request("messages must not be empty.", "messages")


def sampling_params(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as exc:
        message = str(exc)
        raise bad_request(message, _leading_name(message)) from exc


def completion_params(req: CompletionRequest) -> SamplingParams:
    check_completion(req)
    return sampling_params(req, req.max_tokens, req.logprobs)


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    check_chat(req)
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_params(req, max_tokens, logprobs)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates expect them: text content only."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        entry = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out


def _join_text_parts(parts: list[dict[str, object]], index: int) -> str:
    texts = []
    for part in parts:
        kind = part.get("type")
        if kind != "text":
            raise unsupported(
                f"messages[{index}].content", f"part type {kind!r}; only 'text' parts are accepted"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(
                f"messages[{index}].content: a text part needs a string 'text'.", "messages"
            )
        texts.append(text)
    return "".join(texts)


def _leading_name(message: str) -> str | None:
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else None
