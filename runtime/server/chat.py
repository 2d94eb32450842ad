"""POST /v1/chat/completions: the tokenizer's (or --chat-template's) template, then generate."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response
from transformers import PreTrainedTokenizerBase

from pinnace.runtime.chat_template import apply_chat_template
from pinnace.runtime.sampling_params import ParameterError, SamplingParams
from pinnace.runtime.server.deltas import Delta, DeltaTracker, stream_deltas
from pinnace.runtime.server.errors import APIError, bad_request
from pinnace.runtime.server.logprobs import chat_logprobs, prompt_logprobs_of
from pinnace.runtime.server.openai_params import chat_params, constraint_param, message_dicts
from pinnace.runtime.server.openai_protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from pinnace.runtime.server.serving import (
    SSE_DONE,
    EngineRequest,
    ServerContext,
    cancel_on_disconnect,
    prepare_off_loop,
    sse,
    sse_error,
)
from pinnace.runtime.server.sse_chunks import ChunkEnvelope
from pinnace.runtime.server.tool_parsers import ParsedToolCall
from pinnace.runtime.server.tools import ToolPlan, new_tool_call_id, plan_tools


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[Any, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation (runtime/chat_template.py, as `LLM.chat`); a 400 naming
    `messages` when it cannot be templated."""
    try:
        return apply_chat_template(tokenizer, messages, None, add_generation_prompt, tools)
    except ParameterError as exc:
        raise bad_request(str(exc), exc.param) from exc


@dataclass
class ChatJob:
    request_id: str
    model: str
    params: SamplingParams
    request: EngineRequest
    num_top_logprobs: int | None  # None: no logprobs
    tools: ToolPlan
    constraint_param: str  # the parameter a grammar compile error is reported against


def prepare_chat(ctx: ServerContext, req: ChatCompletionRequest) -> ChatJob:
    model = ctx.resolve_model(req.model)
    params = chat_params(req)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, ctx.tool_settings)
    param = constraint_param(req)
    if plan.constraint is not None:
        if params.structured_outputs is not None:
            raise bad_request(
                f"tool_choice {plan.mode!r} cannot be combined with {param}.", "tool_choice"
            )
        params.structured_outputs, param = plan.constraint, "tools"
    messages = message_dicts(req.messages)
    # Before templating: the contents alone may already be too long to ever fit.
    num_chars = sum(len(str(m.get("content") or "")) for m in messages)
    ctx.check_prompt_chars(num_chars, "messages")
    ids = render_chat(
        ctx.engine.tokenizer, messages, req.add_generation_prompt, plan.template_tools
    )
    ids = ctx.prepare(ids, params, param="messages")
    request_id = ctx.new_id("chatcmpl")
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    request = EngineRequest(request_id, ids, params, ctx.lora_for(model))
    return ChatJob(request_id, model, params, request, num_top, plan, param)


async def create_chat_completion(
    ctx: ServerContext, req: ChatCompletionRequest, raw: Request
) -> ChatCompletionResponse | Response:
    # Templating and tokenizing a long conversation must not stall the event loop.
    job = await prepare_off_loop(raw, functools.partial(prepare_chat, ctx, req))
    await ctx.compile_grammar(job.params, job.constraint_param)
    ctx.check_room(job.params.n)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_chat(ctx, job, include_usage, raw.url.path)
        return StreamingResponse(events, media_type="text/event-stream")
    return await cancel_on_disconnect(raw, complete_chat(ctx, job))


def _logprobs(
    ctx: ServerContext, job: ChatJob, token_ids: list[int], entries: list[dict[int, float]] | None
) -> ChatChoiceLogprobs | None:
    if job.num_top_logprobs is None or entries is None:
        return None
    return chat_logprobs(ctx.engine.tokenizer, token_ids, entries, job.num_top_logprobs)


async def complete_chat(ctx: ServerContext, job: ChatJob) -> ChatCompletionResponse:
    (final,) = await ctx.collect([job.request])
    choices = []
    for out in final.outputs:
        content, calls = job.tools.extract(out.text)
        message = ChatResponseMessage(content=content, tool_calls=_tool_calls(calls))
        choices.append(
            ChatChoice(
                index=out.index,
                message=message,
                logprobs=_logprobs(ctx, job, out.token_ids, out.logprobs),
                finish_reason=_finish_reason(job, out.finish_reason, calls),
                stop_reason=out.stop_reason,
            )
        )
    num_out = sum(len(out.token_ids) for out in final.outputs)
    usage = UsageInfo.of(len(job.request.prompt_token_ids), num_out)
    return ChatCompletionResponse(
        id=job.request_id,
        model=job.model,
        choices=choices,
        usage=usage,
        prompt_logprobs=prompt_logprobs_of(ctx.engine.tokenizer, job.params, final),
    )


def _tool_calls(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [
        ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def _finish_reason(job: ChatJob, reason: str | None, calls: list[ParsedToolCall]) -> str | None:
    # OpenAI: "tool_calls" when the model chose to call (auto, required); a forced named
    # call finishes with "stop".
    if calls and reason == "stop" and job.tools.mode in ("auto", "required"):
        return "tool_calls"
    return reason


def _stream_delta(job: ChatJob, delta: Delta, sent: dict[int, int]) -> DeltaMessage | None:
    """The message delta of one engine delta (`sent`: content characters already streamed
    per choice). A named call streams its arguments as they come; an auto reply streams as
    content up to where a call could begin, and its calls when it finishes; a required
    reply (a JSON list of calls) when it finishes."""
    text, index, mode = delta.full_text, delta.index, job.tools.mode
    first = index not in sent
    if mode == "none":
        return DeltaMessage(content=delta.text)
    if mode == "named" and job.tools.named is not None:
        sent[index] = 0
        fn = DeltaFunctionCall(arguments=delta.text)
        call = DeltaToolCall(index=0, function=fn)
        if first:
            call.id, call.type, fn.name = new_tool_call_id(), "function", job.tools.named
        return DeltaMessage(tool_calls=[call])
    done = sent.get(index, 0)
    if delta.finish_reason is None:
        safe = job.tools.content_prefix(text) if mode == "auto" else 0
        if safe <= done:
            return None
        sent[index] = safe
        return DeltaMessage(content=text[done:safe])
    content, calls = job.tools.extract(text)
    rest = content[done:] if content is not None and len(content) > done else None
    sent[index] = done + len(rest or "")
    if not calls:
        return DeltaMessage(content=rest or "")
    return DeltaMessage(
        content=rest,
        tool_calls=[
            DeltaToolCall(
                index=i,
                id=new_tool_call_id(),
                type="function",
                function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
            )
            for i, c in enumerate(calls)
        ],
    )


async def stream_chat(
    ctx: ServerContext, job: ChatJob, include_usage: bool, path: str
) -> AsyncIterator[str]:
    """A role delta per choice, content deltas, a finish_reason chunk, usage, [DONE]."""
    created = int(time.time())

    def response(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        body = ChatCompletionChunk(
            id=job.request_id, created=created, model=job.model, choices=choices, usage=usage
        )
        return sse(body.model_dump_json(exclude_none=True))

    chunk = ChunkEnvelope(
        ChatCompletionChunk(id=job.request_id, created=created, model=job.model, choices=[])
    ).chunk

    tracker = DeltaTracker()
    sent: dict[int, int] = {}  # content characters streamed, per choice
    try:
        for i in range(job.params.n):
            first = DeltaMessage(role="assistant", content="")
            yield chunk(ChatStreamChoice(index=i, delta=first))
        async with stream_deltas(ctx, [job.request], tracker) as deltas:
            async for _, _, delta in deltas:
                message = _stream_delta(job, delta, sent)
                if message is None:
                    continue
                finish = delta.finish_reason
                if finish is not None and job.tools.mode in ("auto", "required"):
                    finish = _finish_reason(job, finish, job.tools.extract(delta.full_text)[1])
                choice = ChatStreamChoice(
                    index=delta.index,
                    delta=message,
                    logprobs=_logprobs(ctx, job, delta.token_ids, delta.logprobs),
                    finish_reason=finish,
                    stop_reason=delta.stop_reason,
                )
                yield chunk(choice)
        if include_usage:
            usage = UsageInfo.of(len(job.request.prompt_token_ids), tracker.num_tokens)
            yield response([], usage)
    except APIError as exc:
        yield sse_error(path, exc)
    yield SSE_DONE
