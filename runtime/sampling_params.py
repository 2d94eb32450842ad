"""Per-request sampling settings, validated once for the Python API, the CLI and HTTP."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

# vLLM clamps logit_bias values to OpenAI's documented range.
MAX_LOGIT_BIAS = 100.0


class ParameterError(ValueError):
    """A request parameter the engine cannot accept; `param` names it (the server puts it
    in the OpenAI error body's `param`), so no caller has to parse the message."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[ParameterError], tuple[str, str]]:
        # Pickled whole (it may cross from the engine core's process).
        return type(self), (self.param, str(self))


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's names): a JSON schema, any JSON object, a regex, one
    of several strings, or an EBNF grammar. Exactly one must be set."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = [k for k, v in self._values().items() if v is not None and v is not False]
        if len(kinds) != 1:
            raise ParameterError(
                "structured_outputs",
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                f"json_object; got {kinds or 'none'}.",
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ParameterError(
                "structured_outputs",
                "structured_outputs choice must be a list of non-empty strings.",
            )

    def _values(self) -> dict[str, Any]:
        return {
            "json": self.json,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object,
        }

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): the grammar cache's key; equal keys compile to the same grammar."""
        for kind, value in self._values().items():
            if value is None or value is False:
                continue
            if kind == "json" and not isinstance(value, str):
                return kind, json.dumps(value)  # key order kept: it orders the output
            if kind == "choice":
                return kind, json.dumps(value)
            return kind, "" if kind == "json_object" else str(value)
        raise AssertionError("unreachable: validated in __post_init__")


@dataclass
class SamplingParams:
    """How to turn logits into tokens and when to stop (vLLM's names and defaults)."""

    n: int = 1
    best_of: int | None = None  # sample this many, return the n best by cumulative logprob
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens (HF / vLLM)
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per output token
    # Top logprobs per prompt token (0: only the prompt token's own); the prompt then
    # skips the prefix cache, so every position is computed.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    stop_strings: list[str] = field(init=False, default_factory=list)
    # Filled by update_from_tokenizer: each bad word's token ids, with and without a space.
    bad_words_token_ids: list[list[int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ParameterError("n", f"n must be at least 1, got {self.n}.")
        if self.best_of is not None and self.best_of < self.n:
            raise ParameterError(
                "best_of", f"best_of must be at least n ({self.n}), got {self.best_of}."
            )
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ParameterError(
                "temperature", f"temperature must be non-negative, got {self.temperature}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ParameterError("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ParameterError(
                "top_k", f"top_k must be -1 (disable) or at least 1, got {self.top_k}."
            )
        self._check_penalties()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ParameterError(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}."
            )
        if self.min_tokens < 0:
            raise ParameterError(
                "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}."
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParameterError(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).",
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ParameterError("logprobs", f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ParameterError(
                "prompt_logprobs",
                f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.",
            )
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif self.stop is None:
            self.stop_strings = []
        else:
            self.stop_strings = list(self.stop)
        if any(not s for s in self.stop_strings):
            raise ParameterError("stop", "stop strings must be non-empty.")
        self.stop_token_ids = list(self.stop_token_ids or [])

    def _check_penalties(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise ParameterError("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ParameterError(name, f"{name} must be in [-2, 2], got {value}.")
        if not self.repetition_penalty > 0.0:
            raise ParameterError(
                "repetition_penalty",
                f"repetition_penalty must be positive, got {self.repetition_penalty}.",
            )
        if self.logit_bias is not None:
            self.logit_bias = {
                int(t): max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(b)))
                for t, b in self.logit_bias.items()
            }
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ParameterError("allowed_token_ids", "allowed_token_ids must not be empty.")
        if self.bad_words is not None and any(not w.strip() for w in self.bad_words):
            raise ParameterError("bad_words", "bad_words must be non-empty strings.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_samples(self) -> int:
        """Sequences the engine runs for this request: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def for_sample(self, index: int) -> SamplingParams:
        """Params of the index-th sample: n=1, and a distinct seed if one was set; ranking
        best_of samples needs each token's logprob, so it is always computed then."""
        seed = None if self.seed is None else self.seed + index
        logprobs = self.logprobs
        if self.num_samples > self.n and logprobs is None:
            logprobs = 0
        # Prompt logprobs are the same for every sample: the first computes them.
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        child = replace(
            self, n=1, best_of=None, seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs
        )
        child.bad_words_token_ids = self.bad_words_token_ids
        return child

    def update_from_tokenizer(self, tokenizer: _Tokenizer, vocab_size: int) -> None:
        """Check token ids against the vocabulary and tokenize bad_words (vLLM: each word
        with and without a leading space, as it can appear mid-text or first)."""
        for name, ids in (
            ("logit_bias", list(self.logit_bias or {})),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ParameterError(
                    name,
                    f"{name} has token id {bad[0]}, outside the vocabulary (size {vocab_size}).",
                )
        variants: list[list[int]] = []
        for word in self.bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in variants:
                    variants.append(ids)
        self.bad_words_token_ids = variants
