"""OpenAI request -> SamplingParams, rejecting by name what the engine can't do."""

from __future__ import annotations

import json
from typing import Any

from pinnace.runtime.sampling_params import (
    ParameterError,
    SamplingParams,
    StructuredOutputsParams,
)
from pinnace.runtime.server.errors import bad_request, unsupported
from pinnace.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)


def check_common(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    fmt = req.response_format
    if req.structured_outputs is not None and fmt is not None and fmt.type != "text":
        raise bad_request(
            "give either structured_outputs or response_format, not both.", "response_format"
        )


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.best_of is not None and req.best_of > req.n and req.stream:
        raise bad_request("best_of greater than n cannot be streamed.", "best_of")
    if req.use_beam_search:
        if req.stream:
            raise bad_request("beam search results cannot be streamed.", "use_beam_search")
        if req.best_of is not None or req.structured_outputs or req.response_format:
            raise bad_request(
                "use_beam_search cannot be combined with best_of or structured outputs.",
                "use_beam_search",
            )
    if req.suffix:
        raise unsupported("suffix")
    if req.echo and req.logprobs is not None:
        raise unsupported("logprobs", "with echo it needs prompt logprobs")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.functions:
        raise unsupported("functions")
    if req.function_call not in (None, "none"):
        raise unsupported("function_call")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
    if not req.messages:
        raise bad_request("messages must not be empty.", "messages")
    if req.prompt_logprobs is not None and req.stream:
        # vLLM returns them on whole chat responses only (there is no chunk field for them).
        raise bad_request(
            "prompt_logprobs is not supported with stream on chat completions.",
            "prompt_logprobs",
        )


def structured_outputs(req: SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint (structured_outputs or response_format)."""
    try:
        if req.structured_outputs is not None:
            so = req.structured_outputs
            spec = StructuredOutputsParams(
                json=so.json_,
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=so.json_object,
            )
            return spec
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema.", "response_format"
            )
        return StructuredOutputsParams(json=fmt.json_schema.schema_)
    except ValueError as exc:
        raise bad_request(str(exc), constraint_param(req)) from exc


def constraint_param(req: SamplingFields) -> str:
    """The parameter a compile error is reported against."""
    return "structured_outputs" if req.structured_outputs is not None else "response_format"


def _logit_bias(req: SamplingFields) -> dict[int, float] | None:
    if req.logit_bias is None:
        return None
    try:
        return {int(k): v for k, v in req.logit_bias.items()}
    except ValueError as exc:
        raise bad_request("logit_bias keys must be token ids (integers).", "logit_bias") from exc


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    best_of: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams of a request; its structured output is checked by name but compiled
    later (ServerContext.compile_grammar, off the event loop)."""
    spec = structured_outputs(req)
    try:
        return SamplingParams(
            n=req.n,
            best_of=best_of,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=_logit_bias(req),
            bad_words=req.bad_words,
            allowed_token_ids=req.allowed_token_ids,
            structured_outputs=spec,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ParameterError as exc:
        raise bad_request(str(exc), exc.param) from exc


def completion_params(req: CompletionRequest) -> SamplingParams:
    check_completion(req)
    return sampling_params(req, req.max_tokens, req.logprobs, req.best_of, req.prompt_logprobs)


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    check_chat(req)
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_params(req, max_tokens, logprobs, prompt_logprobs=req.prompt_logprobs)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text content, tool calls with their
    arguments as objects (templates write them with `tojson`), tool results' call ids."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(c, i) for c in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _template_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"messages[{index}].tool_calls: each needs function.name.", "messages")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise bad_request(
                f"messages[{index}].tool_calls: arguments must be a JSON object.", "messages"
            ) from exc
    return {**call, "function": {"name": fn["name"], "arguments": args}}


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
