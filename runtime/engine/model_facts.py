"""ModelFacts: what a front end knows of the served model without holding its weights,
and the request checks that need only that (tokenize, validate). `LLMEngine` and
`AsyncLLMEngine` both check requests here, in one place, and `prepare` turns a user's
request into the core's requests the same way for every engine."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.core_messages import CoreReady, loads
from pinnace.runtime.engine.engine_core import (
    CoreRequest,
    EngineCore,
    require_runner,
    validate_request,
)
from pinnace.runtime.engine.output_processor import OutputProcessor
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.sampling_params import SamplingParams


@dataclass
class ModelFacts:
    config: EngineConfig
    tokenizer: PreTrainedTokenizerBase
    model_config: PretrainedConfig
    eos_token_ids: frozenset[int]
    vocab_size: int
    max_model_len: int
    runner_type: str  # "generate" or "pooling", as the core resolved it

    @classmethod
    def of_core(cls, core: EngineCore) -> ModelFacts:
        """An engine core in this process."""
        return cls(
            core.config, core.tokenizer, core.model_config, core.eos_token_ids,
            core.vocab_size, core.max_model_len, core.runner_type,
        )  # fmt: skip

    @classmethod
    def of_ready(cls, config: EngineConfig, ready: CoreReady) -> ModelFacts:
        """What an engine-core process told when it was ready."""
        tokenizer, model_config, eos_token_ids = loads(ready.model_facts)
        return cls(
            config, tokenizer, model_config, frozenset(eos_token_ids),
            int(model_config.vocab_size), ready.max_model_len, ready.runner_type,
        )  # fmt: skip

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request before it is queued (ValueError with a user-facing message);
        returns its resolved max_tokens."""
        return validate_request(
            prompt_token_ids,
            params,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            max_logprobs=self.config.max_logprobs,
        )

    def prepare(
        self,
        processor: OutputProcessor,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
    ) -> list[CoreRequest]:
        """Check a generation request (ValueError with a user-facing message), track it
        in `processor`; returns its scheduler requests (n samples) for the core."""
        require_runner(self.runner_type, "generate")
        prompt_ids = self.tokenize(prompt)
        max_tokens = self.validate(prompt_ids, params)
        text = prompt if isinstance(prompt, str) else None
        return processor.add_request(
            request_id, text, prompt_ids, params, max_tokens, cache_salt, lora_request,
            arrival_time,
        )  # fmt: skip
