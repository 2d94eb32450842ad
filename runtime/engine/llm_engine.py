"""The in-process engine: requests in, one schedule -> execute -> update step at a time,
outputs out. The core (scheduler + model) and the output processor (text, stop strings,
n samples) run in the caller's process and thread; `pinnace serve` runs the same two
halves in two processes instead (async_engine.py, core_proc.py)."""

from __future__ import annotations

import logging

import torch

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.engine_core import EngineCore, require_runner
from pinnace.runtime.engine.model_facts import ModelFacts
from pinnace.runtime.engine.output_processor import OutputProcessor
from pinnace.runtime.engine.step_profile import profile
from pinnace.runtime.lora.adapter import LoRAAdapter
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from pinnace.runtime.request import RequestStatus
from pinnace.runtime.sampling_params import SamplingParams, StructuredOutputsParams
from pinnace.runtime.worker.pooler import PoolingConfig

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        core = self.core
        core.profile = profile("offline")  # an AsyncLLMEngine's thread sets "core"
        self.parts = core.parts
        self.tokenizer = core.tokenizer
        self.model_config = core.model_config
        self.max_model_len = core.max_model_len
        self.eos_token_ids = core.eos_token_ids
        self.vocab_size = core.vocab_size
        self.scheduler = core.scheduler
        self.runner = core.runner
        self.pooling = core.pooling
        self.runner_type = core.runner_type
        self.grammar = core.grammar
        self.lora = core.lora
        self.facts = ModelFacts.of_core(core)
        self.output_processor = OutputProcessor(self.tokenizer)

    # -- intake ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.facts.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request before it is queued; returns its resolved max_tokens."""
        return self.facts.validate(prompt_token_ids, params)

    def check_constraint(self, spec: StructuredOutputsParams) -> None:
        """ValueError for a constraint that cannot compile (compiled and cached now, for
        the sampler)."""
        self.grammar.compile(spec)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request; with `lora_request` it runs with that adapter (registered and
        read from its folder first if the engine does not hold it yet)."""
        requests = self.facts.prepare(
            self.output_processor, request_id, prompt, params, cache_salt, lora_request
        )
        added: list[str] = []
        try:
            for request in requests:
                self.core.add_request(request)
                added.append(request.req_id)
        except BaseException:  # e.g. the adapter's folder is gone: nothing half-queued
            self.output_processor.abort_request(request_id)
            self.core.finish_requests(added)
            raise

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.core.finish_requests(self.output_processor.abort_request(request_id))

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that made progress."""
        processed = self.output_processor.process(self.core.step())
        # Samples a stop string ended free their KV before the next step.
        self.core.finish_requests(processed.stopped, RequestStatus.FINISHED_STOPPED)
        return processed.outputs

    def embed(
        self, prompts: list[str | list[int]], pooling: PoolingConfig | None = None
    ) -> list[EmbeddingRequestOutput]:
        """Pooled embeddings of whole prompts, in one forward outside the scheduler."""
        self.require_runner("pooling")
        ids = [self.tokenize(p) for p in prompts]
        for prompt_ids in ids:
            self.validate(prompt_ids, SamplingParams(max_tokens=1))
        return self.core.embed(ids, pooling)

    def require_runner(self, needed: str) -> None:
        """ValueError unless this engine runs the `needed` runner ("generate"/"pooling")."""
        require_runner(self.runner_type, needed)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # -- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) ------------------------

    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter folder without registering it; safe from any thread.

        ValueError when it does not fit this model, FileNotFoundError when it is missing.
        """
        return self.core.load_lora(lora_request)

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Register an adapter (`adapter`: its `load_lora`, read here when None); False if
        its id is registered already."""
        return self.core.add_lora(lora_request, adapter)

    def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter by id: new requests can't use it; running ones finish."""
        return self.core.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    def num_unfinished_requests(self) -> int:
        """User requests held here or (stepped by an AsyncLLMEngine's thread) in the core."""
        in_core = {req_id.partition("#")[0] for req_id in self.scheduler.requests}
        return len(in_core | set(self.output_processor.request_ids()))

    def stats(self) -> SchedulerStats:
        return self.core.stats()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    @property
    def device(self) -> torch.device:
        return self.parts.device
