"""POST /v1/completions: one or many prompts, n samples each, whole or streamed."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from pinnace.runtime.beam_search import BeamSearchParams
from pinnace.runtime.engine.step_profile import profile
from pinnace.runtime.outputs import RequestOutput
from pinnace.runtime.sampling_params import ParameterError, SamplingParams
from pinnace.runtime.server.beam import beam_search
from pinnace.runtime.server.deltas import DeltaTracker, stream_deltas
from pinnace.runtime.server.errors import APIError, bad_request
from pinnace.runtime.server.logprobs import completion_logprobs, prompt_logprobs_of
from pinnace.runtime.server.openai_params import completion_params, constraint_param
from pinnace.runtime.server.openai_protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
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


@dataclass
class CompletionJob:
    """A validated request: one engine request per prompt, all with the same params."""

    request_id: str
    model: str
    params: SamplingParams
    requests: list[EngineRequest]
    echo_texts: list[str] | None  # the prompts as text, when echo is on

    def choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.params.n + sample_index

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The four OpenAI prompt forms as a list of single prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt]]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def prepare_completion(ctx: ServerContext, req: CompletionRequest) -> CompletionJob:
    model = ctx.resolve_model(req.model)
    params = completion_params(req)
    prompts = prompt_list(req.prompt)
    request_id = ctx.new_id("cmpl")
    requests = [
        EngineRequest(f"{request_id}-{i}", ctx.prepare(p, params), params, ctx.lora_for(model))
        for i, p in enumerate(prompts)
    ]
    echo = None
    if req.echo:
        tokenizer = ctx.engine.tokenizer
        echo = [p if isinstance(p, str) else str(tokenizer.decode(p)) for p in prompts]
    return CompletionJob(request_id, model, params, requests, echo)


async def create_completion(
    ctx: ServerContext, req: CompletionRequest, raw: Request
) -> CompletionResponse | Response:
    received = time.monotonic()
    # Tokenizing long prompts must not stall the event loop (probes, other streams).
    job = await prepare_off_loop(raw, functools.partial(prepare_completion, ctx, req))
    await ctx.compile_grammar(job.params, constraint_param(req))
    ctx.check_room(len(job.requests) * job.params.num_samples)
    if req.use_beam_search:
        beams = BeamSearchParams(
            job.params.n, job.params.max_tokens or 16, job.params.ignore_eos, req.length_penalty
        )
        try:  # n is the beam width here: a width too wide is the user's n, not logprobs
            beams.check_logprobs_room(ctx.engine.eos_token_ids, ctx.engine.config.max_logprobs, "n")
        except ParameterError as exc:
            raise bad_request(str(exc), exc.param) from exc
        return await cancel_on_disconnect(raw, complete_beams(ctx, job, beams))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_completion(ctx, job, include_usage, raw.url.path, received)
        return StreamingResponse(events, media_type="text/event-stream")
    return await cancel_on_disconnect(raw, complete(ctx, job))


async def complete_beams(
    ctx: ServerContext, job: CompletionJob, params: BeamSearchParams
) -> CompletionResponse:
    """Each prompt's n beams as its n choices, best first."""
    results = await asyncio.gather(*(beam_search(ctx, r, params) for r in job.requests))
    choices = [
        CompletionChoice(
            index=job.choice_index(i, k),
            text=(job.echo_texts[i] if job.echo_texts else "") + (seq.text or ""),
            finish_reason="stop" if seq.is_finished else "length",
        )
        for i, result in enumerate(results)
        for k, seq in enumerate(result.sequences)
    ]
    num_out = sum(len(s.output_tokens) for r in results for s in r.sequences)
    usage = UsageInfo.of(job.num_prompt_tokens, num_out)
    return CompletionResponse(id=job.request_id, model=job.model, choices=choices, usage=usage)


async def complete(ctx: ServerContext, job: CompletionJob) -> CompletionResponse:
    finals = await ctx.collect(job.requests)
    choices = [
        _choice(ctx, job, i, final, c.index)
        for i, final in enumerate(finals)
        for c in final.outputs
    ]
    num_out = sum(len(c.token_ids) for f in finals for c in f.outputs)
    usage = UsageInfo.of(job.num_prompt_tokens, num_out)
    return CompletionResponse(id=job.request_id, model=job.model, choices=choices, usage=usage)


def _choice(
    ctx: ServerContext, job: CompletionJob, prompt_index: int, final: RequestOutput, sample: int
) -> CompletionChoice:
    out = final.outputs[sample]
    prefix = job.echo_texts[prompt_index] if job.echo_texts else ""
    logprobs = None
    if job.params.logprobs is not None and out.logprobs is not None:
        logprobs = completion_logprobs(
            ctx.engine.tokenizer, out.token_ids, out.logprobs, len(prefix)
        )
    return CompletionChoice(
        index=job.choice_index(prompt_index, out.index),
        text=prefix + out.text,
        logprobs=logprobs,
        prompt_logprobs=_prompt_logprobs(ctx, job, final),
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
    )


def _prompt_logprobs(
    ctx: ServerContext, job: CompletionJob, output: RequestOutput
) -> list[dict[int, PromptLogprob] | None] | None:
    return prompt_logprobs_of(ctx.engine.tokenizer, job.params, output)


async def stream_completion(
    ctx: ServerContext,
    job: CompletionJob,
    include_usage: bool,
    path: str,
    received: float | None = None,
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed completion; `received`: when the route got the request
    (time.monotonic(); the profile's request_to_first_chunk)."""
    created = int(time.time())

    def response(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        body = CompletionResponse(
            id=job.request_id, created=created, model=job.model, choices=choices, usage=usage
        )
        return sse(body.model_dump_json(exclude_none=True))

    chunk = ChunkEnvelope(
        CompletionResponse(id=job.request_id, created=created, model=job.model, choices=[])
    ).chunk

    tracker = DeltaTracker()
    prof = profile("frontend")
    offsets: dict[int, int] = {}  # text sent per choice, for logprobs' text_offset
    try:
        for i, text in enumerate(job.echo_texts or []):
            for s in range(job.params.n):
                offsets[job.choice_index(i, s)] = len(text)
                yield chunk(CompletionChoice(index=job.choice_index(i, s), text=text))
        async with stream_deltas(ctx, job.requests, tracker) as deltas:
            async for prompt_index, output, delta in deltas:
                start = time.perf_counter()
                index = job.choice_index(prompt_index, delta.index)
                logprobs = None
                if job.params.logprobs is not None and delta.logprobs is not None:
                    logprobs = completion_logprobs(
                        ctx.engine.tokenizer, delta.token_ids, delta.logprobs, offsets.get(index, 0)
                    )
                offsets[index] = offsets.get(index, 0) + len(delta.text)
                # As vLLM: a choice's prompt logprobs travel in its first chunk.
                first = delta.is_first
                choice = CompletionChoice(
                    index=index,
                    text=delta.text,
                    logprobs=logprobs,
                    prompt_logprobs=_prompt_logprobs(ctx, job, output) if first else None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
                data = chunk(choice)
                prof.add("sse", time.perf_counter() - start)
                yield data  # resumes once written to the connection
                if received is not None and delta.text:
                    prof.add("request_to_first_chunk", time.monotonic() - received)
                    received = None
        if include_usage:
            yield response([], UsageInfo.of(job.num_prompt_tokens, tracker.num_tokens))
    except APIError as exc:
        yield sse_error(path, exc)
    yield SSE_DONE
