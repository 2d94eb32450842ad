"""`use_beam_search` on /v1/completions: runtime/beam_search.py's steps over the async
engine, one max_tokens=1 request per live beam per step (their prompts' full KV blocks
come from the prefix cache)."""

from __future__ import annotations

from pinnace.runtime.beam_search import (
    BeamSearchInstance,
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
)
from pinnace.runtime.server.serving import EngineRequest, ServerContext


async def beam_search(
    ctx: ServerContext, request: EngineRequest, params: BeamSearchParams
) -> BeamSearchOutput:
    """The beam_width best continuations of `request`'s prompt, best first, with text."""
    prompt = request.prompt_token_ids
    inst = BeamSearchInstance([BeamSearchSequence(list(prompt), len(prompt))])
    eos = ctx.engine.eos_token_ids
    step = params.step_params(eos)
    for i in range(params.max_tokens):
        if not inst.beams:
            break
        beams = [
            EngineRequest(f"{request.request_id}-s{i}b{j}", b.tokens, step, request.lora_request)
            for j, b in enumerate(inst.beams)
        ]
        finals = await ctx.collect(beams)
        inst.step([(f.outputs[0].logprobs or [{}])[0] for f in finals], params, eos)
    result = inst.result(params)
    tokenizer = ctx.engine.tokenizer
    for seq in result.sequences:
        seq.text = str(tokenizer.decode(seq.output_tokens, skip_special_tokens=True))
    return result
