"""What one HTTP request may cost the shared engine, checked before it is queued.

OpenAI allows 4 stop strings; these bounds are far above what clients use, and keep any
single request from costing the batch more than a normal long one:

    stop strings     at most 1,024, each at most 256 characters, 65,536 in all (the
                     matcher is an automaton over all of them, built per request; the
                     stream holds back the longest one minus one character)
    samples          n (or best_of) at most 128, and samples x max_tokens at most
                     16 x max_model_len tokens of generation
    logprobs         bounded by the engine's --max-logprobs (20 by default)
"""

from __future__ import annotations

from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.server.errors import bad_request

MAX_STOP_STRINGS = 1024
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOTAL_CHARS = 65_536
MAX_SAMPLES = 128
MAX_GENERATION_CONTEXTS = 16  # samples x max_tokens <= this x max_model_len


def check_request_cost(params: SamplingParams, max_tokens: int, max_model_len: int) -> None:
    """A 400 naming the parameter when one request would cost more than the bounds above."""
    stops = params.stop_strings
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}.", "stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise bad_request(
            f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters, "
            f"got one of {longest}.",
            "stop",
        )
    total = sum(len(s) for s in stops)
    if total > MAX_STOP_TOTAL_CHARS:
        raise bad_request(
            f"stop strings may have at most {MAX_STOP_TOTAL_CHARS} characters in all, got {total}.",
            "stop",
        )
    samples = params.num_samples
    if samples > MAX_SAMPLES:
        param = "best_of" if params.best_of is not None else "n"
        raise bad_request(f"{param} must be at most {MAX_SAMPLES}, got {samples}.", param)
    budget = MAX_GENERATION_CONTEXTS * max_model_len
    if samples * max_tokens > budget:
        raise bad_request(
            f"{samples} samples x max_tokens {max_tokens} = {samples * max_tokens} tokens is "
            f"more than one request may generate ({budget}, {MAX_GENERATION_CONTEXTS} x "
            "max_model_len); lower n or max_tokens.",
            "max_tokens",
        )
