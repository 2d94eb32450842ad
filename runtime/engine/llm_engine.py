"""The engine: requests in, one schedule -> execute -> update step at a time, outputs out."""

from __future__ import annotations

import logging
import os
import time

import torch

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.engine.grammar_compiler import GrammarCompiler
from pinnace.runtime.engine.request_state import RequestState
from pinnace.runtime.engine.setup import EngineParts, build_engine_parts
from pinnace.runtime.lora.adapter import LoRAAdapter
from pinnace.runtime.lora.layers import LoRASlotsConfig
from pinnace.runtime.lora.manager import LoRAManager
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.models.registry import resolve_runner
from pinnace.runtime.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pinnace.runtime.request import Request, RequestStatus
from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.worker.grammar_mask import GrammarMasks
from pinnace.runtime.worker.pooler import PoolingConfig, has_pooling_config, pooling_from_folder

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parts: EngineParts = build_engine_parts(config)
        self.parts = parts
        self.tokenizer = parts.checkpoint.tokenizer
        self.model_config = parts.checkpoint.config
        self.max_model_len = parts.max_model_len
        self.eos_token_ids = frozenset(parts.checkpoint.eos_token_ids)
        self.vocab_size = int(self.model_config.vocab_size)
        kv = KVCacheManager(
            parts.num_blocks, config.block_size, config.enable_prefix_caching, parts.sliding_window
        )
        self.scheduler = Scheduler(
            kv,
            config.max_num_seqs,
            config.resolved_max_num_batched_tokens,
            self.max_model_len,
            max_loras=config.max_loras if config.enable_lora else 0,
        )
        self.runner = parts.runner
        # How embeddings are pooled by default: a sentence-transformers folder says so.
        is_folder = os.path.isdir(config.model)
        self.pooling = pooling_from_folder(config.model) if is_folder else PoolingConfig()
        # What this engine serves: "generate" (requests) or "pooling" (embed) -- never both,
        # as in vLLM, so a deployment's endpoints say what the model is for.
        self.runner_type = resolve_runner(
            config.runner,
            config.convert,
            getattr(self.model_config, "architectures", None),
            is_folder and has_pooling_config(config.model),
        )
        # Structured outputs: grammars compiled (and cached) off the engine thread, masks
        # applied by the sampler.
        self.grammar = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        self.runner.sampler.grammar = GrammarMasks(self.grammar)
        self._states: dict[str, RequestState] = {}  # by user request id
        self._child_to_parent: dict[str, str] = {}
        self.lora: LoRAManager | None = None
        self._lora_keys: dict[str, int] = {}  # user request id -> its adapter's key
        if config.enable_lora:
            self.lora = LoRAManager(
                self.runner.model,
                LoRASlotsConfig(config.max_loras, config.max_lora_rank),
                config.max_cpu_loras or config.max_loras,
                parts.dtype,
                parts.device,
            )
            self.runner.lora = self.lora

    # -- intake ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request before it is queued; returns its resolved max_tokens."""
        num = len(prompt_token_ids)
        if num == 0:
            raise ValueError("the prompt is empty.")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of vocabulary (size {self.vocab_size}).")
        room = self.max_model_len - num
        if room < 1:
            raise ValueError(
                f"the prompt is {num} tokens, but this model's maximum context length "
                f"(max_model_len) is {self.max_model_len} tokens."
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the {num}-token prompt exceeds this "
                f"model's maximum context length of {self.max_model_len} tokens."
            )
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(
                f"logprobs={params.logprobs} exceeds max_logprobs={self.config.max_logprobs}."
            )
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.config.max_logprobs:
            raise ValueError(
                f"prompt_logprobs={params.prompt_logprobs} exceeds "
                f"max_logprobs={self.config.max_logprobs}."
            )
        params.update_from_tokenizer(self.tokenizer, self.vocab_size)
        return params.max_tokens if params.max_tokens is not None else room

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
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use.")
        self.require_runner("generate")
        prompt_ids = self.tokenize(prompt)
        max_tokens = self.validate(prompt_ids, params)
        lora_key = self._acquire_lora(lora_request)
        if lora_key:
            self._lora_keys[request_id] = lora_key
        text = prompt if isinstance(prompt, str) else None
        state = RequestState(request_id, text, prompt_ids, params, self.tokenizer)
        self._states[request_id] = state
        now = time.monotonic()
        for i, child_id in enumerate(state.child_ids):
            self._child_to_parent[child_id] = request_id
            child_params = params if params.num_samples == 1 else params.for_sample(i)
            self.scheduler.add_request(
                Request(
                    req_id=child_id,
                    prompt_token_ids=prompt_ids,
                    sampling_params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    max_tokens=max_tokens,
                    cache_salt=cache_salt,
                    lora_id=lora_key,
                    lora_name=lora_request.lora_name if lora_request else None,
                    arrival_time=now,
                )
            )

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is None:
                continue
            for child_id in state.child_ids:
                self._child_to_parent.pop(child_id, None)
            self.scheduler.finish_requests(state.child_ids, RequestStatus.FINISHED_ABORTED)
            self._release_lora(request_id)

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that made progress."""
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        updates = self.scheduler.update_from_output(sched, result)
        touched: dict[str, RequestState] = {}
        for update in updates:
            parent = self._child_to_parent.get(update.req_id)
            if parent is None:
                continue
            state = self._states[parent]
            sample = state.samples[update.req_id]
            if sample.apply(update) is not None:
                self.scheduler.finish_requests(
                    [update.req_id], RequestStatus.FINISHED_STOPPED, sample.stop_reason
                )
            if sample.index == 0:
                state.num_cached_tokens = update.num_cached_tokens
                if update.prompt_logprobs is not None:
                    state.prompt_logprobs = [None, *update.prompt_logprobs]
            touched[parent] = state
        outputs = []
        for request_id, state in touched.items():
            outputs.append(state.output())
            if state.finished:
                del self._states[request_id]
                for child_id in state.child_ids:
                    self._child_to_parent.pop(child_id, None)
                self._release_lora(request_id)
        return outputs

    def embed(
        self, prompts: list[str | list[int]], pooling: PoolingConfig | None = None
    ) -> list[EmbeddingRequestOutput]:
        """Pooled embeddings of whole prompts, in one forward outside the scheduler."""
        self.require_runner("pooling")
        ids = [self.tokenize(p) for p in prompts]
        for prompt_ids in ids:
            self.validate(prompt_ids, SamplingParams(max_tokens=1))
        pooling = pooling or self.pooling
        vectors = self.runner.embed(ids, pooling).cpu().tolist()
        return [
            EmbeddingRequestOutput(p, EmbeddingOutput(v)) for p, v in zip(ids, vectors, strict=True)
        ]

    def require_runner(self, needed: str) -> None:
        """ValueError unless this engine runs the `needed` runner ("generate"/"pooling")."""
        if self.runner_type != needed:
            what = "generation" if needed == "generate" else "embeddings"
            raise ValueError(
                f"this model runs with runner {self.runner_type!r}, which does not serve "
                f"{what}; start it with runner {needed!r} (--runner {needed})."
            )

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) ------------------------

    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter folder without registering it; safe from any thread.

        ValueError when it does not fit this model, FileNotFoundError when it is missing.
        """
        return self._require_lora().load(lora_request)

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Register an adapter (`adapter`: its `load_lora`, read here when None); False if
        its id is registered already."""
        return self._require_lora().add(lora_request, adapter)

    def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter by id: new requests can't use it; running ones finish."""
        return self._require_lora().remove(lora_id)

    def list_loras(self) -> set[int]:
        return {r.lora_int_id for r in self.lora.list_loras()} if self.lora else set()

    def _require_lora(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True.")
        return self.lora

    def _acquire_lora(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return 0
        return self._require_lora().acquire(lora_request)

    def _release_lora(self, request_id: str) -> None:
        key = self._lora_keys.pop(request_id, None)
        if key is not None and self.lora is not None:
            self.lora.release(key)

    def num_unfinished_requests(self) -> int:
        return len(self._states)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.pool.reset_prefix_cache()

    @property
    def device(self) -> torch.device:
        return self.parts.device
