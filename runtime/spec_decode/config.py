"""`speculative_config` (vLLM's shape): method, num_speculative_tokens, prompt lookup range,
draft model. Plain Python: the CLI, the Python API and the operator validate through it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
# vLLM's default n-gram range when neither end is given.
_DEFAULT_LOOKUP = 5


@dataclass
class SpeculativeConfig:
    num_speculative_tokens: int
    method: str | None = None  # None: draft_model when `model` is given
    prompt_lookup_min: int | None = None  # ngram: shortest suffix matched
    prompt_lookup_max: int | None = None  # ngram: longest suffix matched (tried first)
    # draft_model: a smaller model (folder or GGUF file) with the target's vocabulary; it
    # proposes greedily, and its KV cache shares the target's block ids (engine/setup.py).
    model: str | None = None
    # No proposals in steps where more requests than this sample (vLLM's field; its default
    # is None, never). A large batch is compute-bound, so verifying k + 1 tokens per request
    # costs more than it saves: hack/bench/speculative.py measured 0.42x at batch 32 on CPU
    # without it. None: speculate at any batch size.
    disable_by_batch_size: int | None = 8

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = "draft_model" if self.model is not None else None
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config method {self.method!r} is not one of "
                f"{', '.join(METHODS)} (or give a draft `model`)."
            )
        _positive("num_speculative_tokens", self.num_speculative_tokens)
        if self.disable_by_batch_size is not None:
            _positive("disable_by_batch_size", self.disable_by_batch_size)
        if self.method == "ngram":
            self._resolve_lookup()
            if self.model is not None:
                raise ValueError("speculative_config: method 'ngram' takes no model.")
        elif self.model is None:
            raise ValueError("speculative_config: method 'draft_model' needs a model path.")
        elif self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
            raise ValueError(
                "speculative_config: prompt_lookup_min/max are for method 'ngram', not "
                "'draft_model'."
            )

    def _resolve_lookup(self) -> None:
        """As vLLM: one end given stands for both; neither gives 5..5."""
        lo = _first(self.prompt_lookup_min, self.prompt_lookup_max, _DEFAULT_LOOKUP)
        hi = _first(self.prompt_lookup_max, self.prompt_lookup_min, _DEFAULT_LOOKUP)
        _positive("prompt_lookup_min", lo)
        _positive("prompt_lookup_max", hi)
        if lo > hi:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({lo}) must not exceed "
                f"prompt_lookup_max ({hi})."
            )
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

    @classmethod
    def from_dict(cls, value: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """From the JSON object of `--speculative-config` or `LLM(speculative_config=...)`."""
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown key(s) {unknown}; known: {sorted(known)}."
            )
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens.")
        return cls(**value)


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"speculative_config: {name} must be a positive integer, got {value!r}.")
