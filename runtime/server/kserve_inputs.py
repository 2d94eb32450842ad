"""KServe text inputs -> engine requests: settings from `parameters`, prompts as token ids.

KServe's text protocols carry bare strings. An instruct model (one whose tokenizer has a
chat template, like the default SmolLM2-135M-Instruct) answers a bare question with an
immediate end-of-turn, so by default each text is sent as one user message through the
chat template, exactly as /v1/chat/completions would; `"apply_chat_template": false`
sends the raw text, exactly as /v1/completions would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pinnace.runtime.sampling_params import ParameterError, SamplingParams
from pinnace.runtime.server.chat import render_chat
from pinnace.runtime.server.errors import bad_request, describe_validation_errors
from pinnace.runtime.server.kserve_protocol import KServeParameters
from pinnace.runtime.server.serving import EngineRequest, ServerContext


@dataclass
class KServeOptions:
    params: SamplingParams
    apply_chat_template: bool | None


def parse_options(
    values: dict[str, Any] | None, where: str = "parameters", has_prompt_logprobs: bool = False
) -> KServeOptions:
    """Validate a free-form parameters object; a 400 names the offending key.
    `has_prompt_logprobs`: the route's response can carry prompt_logprobs (V2 generate)."""
    try:
        parsed = KServeParameters.model_validate(values or {})
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        raise bad_request(f"{where}.{message}", param) from exc
    if parsed.prompt_logprobs is not None and not has_prompt_logprobs:
        raise bad_request(
            f"{where}.prompt_logprobs: only V2 generate and generate_stream answer them.",
            "prompt_logprobs",
        )
    settings = parsed.model_dump(exclude={"apply_chat_template"})
    try:
        params = SamplingParams(**settings)
    except ParameterError as exc:
        raise bad_request(f"{where}: {exc}", exc.param) from exc
    return KServeOptions(params, parsed.apply_chat_template)


def engine_request(
    ctx: ServerContext,
    request_id: str,
    text: str,
    options: KServeOptions,
    param: str,
    model: str,
) -> EngineRequest:
    """`model`: a served name, resolved already (an adapter's name runs that adapter)."""
    tokenizer = ctx.engine.tokenizer
    use_template = options.apply_chat_template
    if use_template is None:
        use_template = tokenizer.chat_template is not None
    prompt: str | list[int] = text
    if use_template:
        prompt = render_chat(tokenizer, [{"role": "user", "content": text}])
    ids = ctx.prepare(prompt, options.params, param)
    return EngineRequest(request_id, ids, options.params, ctx.lora_for(model))
