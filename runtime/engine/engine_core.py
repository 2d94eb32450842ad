"""EngineCore: the scheduler and the model, one schedule -> execute -> update step at a time.

It knows scheduler requests only (one per sample: "R" or "R#i"), takes token ids and
returns token ids: tokenizing, detokenizing, stop strings and the n samples of a user
request live in the front end (output_processor.py). The same core runs in the caller's
process (`LLMEngine`, the offline `LLM`) or in a process of its own (core_proc.py, what
`pinnace serve` starts), where nothing else competes with the step for the GIL.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pinnace.runtime.config import SPEC_NEEDS_GENERATE, EngineConfig
from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.core.outputs import RequestUpdate, SchedulerStats
from pinnace.runtime.core.scheduler import Scheduler
from pinnace.runtime.engine.grammar_compiler import GrammarCompiler
from pinnace.runtime.engine.setup import EngineParts
from pinnace.runtime.engine.step_profile import NullProfile
from pinnace.runtime.executor.executor import Executor, make_executor
from pinnace.runtime.lora.adapter import LoRAAdapter
from pinnace.runtime.lora.layers import LoRASlotsConfig
from pinnace.runtime.lora.manager import LoRAManager
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.models.registry import resolve_runner
from pinnace.runtime.outputs import EmbeddingOutput, EmbeddingRequestOutput
from pinnace.runtime.request import Request, RequestStatus
from pinnace.runtime.sampling_params import ParameterError, SamplingParams
from pinnace.runtime.worker.grammar_mask import GrammarMasks
from pinnace.runtime.worker.pooler import PoolingConfig, has_pooling_config, pooling_from_folder

logger = logging.getLogger(__name__)


@dataclass
class CoreRequest:
    """One scheduler request, as the front end hands it to the core (already validated)."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None
    arrival_time: float = field(default_factory=time.monotonic)


def validate_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    max_model_len: int,
    max_logprobs: int,
) -> int:
    """Check a request before it is queued (ValueError with a user-facing message); returns
    its resolved max_tokens. Front ends call it: it needs the tokenizer, not the model."""
    num = len(prompt_token_ids)
    if num == 0:
        raise ValueError("the prompt is empty.")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of vocabulary (size {vocab_size}).")
    room = max_model_len - num
    if room < 1:
        raise ValueError(
            f"the prompt is {num} tokens, but this model's maximum context length "
            f"(max_model_len) is {max_model_len} tokens."
        )
    if params.max_tokens is not None and params.max_tokens > room:
        raise ParameterError(
            "max_tokens",
            f"max_tokens={params.max_tokens} plus the {num}-token prompt exceeds this "
            f"model's maximum context length of {max_model_len} tokens.",
        )
    if params.logprobs is not None and params.logprobs > max_logprobs:
        raise ParameterError(
            "logprobs", f"logprobs={params.logprobs} exceeds max_logprobs={max_logprobs}."
        )
    if params.prompt_logprobs is not None and params.prompt_logprobs > max_logprobs:
        raise ParameterError(
            "prompt_logprobs",
            f"prompt_logprobs={params.prompt_logprobs} exceeds max_logprobs={max_logprobs}.",
        )
    params.update_from_tokenizer(tokenizer, vocab_size)
    return params.max_tokens if params.max_tokens is not None else room


def runner_type_of(config: EngineConfig, model_config: PretrainedConfig) -> str:
    """What an engine serves: "generate" (requests) or "pooling" (embed) -- never both, as
    in vLLM, so a deployment's endpoints say what the model is for."""
    return _resolve_runner(config, getattr(model_config, "architectures", None))


def _resolve_runner(config: EngineConfig, architectures: list[str] | None) -> str:
    is_folder = os.path.isdir(config.model)
    return resolve_runner(
        config.runner,
        config.convert,
        architectures,
        is_folder and has_pooling_config(config.model),
    )


def refuse_parallel_pooling(config: EngineConfig, force: bool = False) -> None:
    """ValueError, before any rank starts, for an embedding engine with more than one rank
    (embeddings are not computed under tensor parallelism yet): it would start, say Ready,
    then fail every embeddings call. Reads only the folder's config.json (`force`: the
    runner is known to be pooling)."""
    if config.world_size == 1:
        return
    architectures = None
    config_json = os.path.join(config.model, "config.json")
    if config.runner == "auto" and os.path.isfile(config_json):
        with open(config_json) as f:
            architectures = json.load(f).get("architectures")
    if force or _resolve_runner(config, architectures) == "pooling":
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size = {config.world_size} with an "
            "embedding model (runner pooling): embeddings are not computed across ranks "
            "yet; serve it with tensor_parallel_size=1."
        )


def require_runner(runner_type: str, needed: str) -> None:
    """ValueError unless an engine running `runner_type` serves `needed`."""
    if runner_type != needed:
        what = "generation" if needed == "generate" else "embeddings"
        raise ValueError(
            f"this model runs with runner {runner_type!r}, which does not serve "
            f"{what}; start it with runner {needed!r} (--runner {needed})."
        )


def _num_lookahead_tokens(config: EngineConfig) -> int:
    """KV slots a draft model writes past each step's tokens: its k proposals."""
    spec = config.speculative
    return spec.num_speculative_tokens if spec and spec.method == "draft_model" else 0


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        refuse_parallel_pooling(config)
        # The model's ranks: this process alone, or one process per rank (driver = rank 0).
        self.executor: Executor = make_executor(config)
        # Its worker ranks stop with the core: on shutdown, or once the core is dropped
        # (an LLM nobody shut down), or at exit; the finalizer holds the executor only.
        self._stop_ranks = weakref.finalize(self, self.executor.shutdown)
        try:
            self._setup(config)
        except BaseException:  # a start-up that fails past this point leaves no ranks
            self._stop_ranks()
            raise

    def _setup(self, config: EngineConfig) -> None:
        parts: EngineParts = self.executor.parts
        self.parts = parts
        self.tokenizer: PreTrainedTokenizerBase = parts.checkpoint.tokenizer
        self.model_config: PretrainedConfig = parts.checkpoint.config
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
            num_lookahead_tokens=_num_lookahead_tokens(config),
        )
        self.runner = parts.runner
        self.profile = NullProfile()  # its core loop (or LLMEngine) sets its own
        # How embeddings are pooled by default: a sentence-transformers folder says so.
        is_folder = os.path.isdir(config.model)
        self.pooling = pooling_from_folder(config.model) if is_folder else PoolingConfig()
        self.runner_type = runner_type_of(config, self.model_config)
        if self.runner_type == "pooling" and config.speculative is not None:
            raise ValueError(SPEC_NEEDS_GENERATE)
        if self.runner_type == "pooling" and self.executor.world_size > 1:
            refuse_parallel_pooling(config, force=True)  # a model not read from a folder
        # Structured outputs: grammars compiled (and cached) ahead of the step where they
        # can be, masks applied by the sampler.
        self.grammar = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        self.runner.sampler.grammar = GrammarMasks(self.grammar)
        self.lora: LoRAManager | None = None
        self._lora_keys: dict[str, int] = {}  # scheduler request id -> its adapter's key
        if config.enable_lora:
            self.lora = LoRAManager(
                self.runner.model,
                LoRASlotsConfig(config.max_loras, config.max_lora_rank),
                config.max_cpu_loras or config.max_loras,
                parts.dtype,
                parts.device,
            )
            self.runner.lora = self.lora

    # -- requests -------------------------------------------------------------------------

    def add_request(self, request: CoreRequest) -> None:
        """Queue one scheduler request. ValueError / FileNotFoundError: its adapter does not
        fit or is gone (nothing is queued then)."""
        lora = request.lora_request
        key = self._require_lora().acquire(lora) if lora is not None else 0
        if key:
            self._lora_keys[request.req_id] = key
        self.scheduler.add_request(
            Request(
                req_id=request.req_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.params,
                eos_token_ids=self.eos_token_ids,
                max_tokens=request.max_tokens,
                cache_salt=self._kv_salt(request),
                lora_id=key,
                lora_name=lora.lora_name if lora else None,
                arrival_time=request.arrival_time,
            )
        )

    def _kv_salt(self, request: CoreRequest) -> str | None:
        """The request's cache salt, marked when the model rotates its tokens with other
        tables than a shorter prompt's (LongRoPE past its switch): such KV blocks are only
        shared between requests rotated alike."""
        offset = self.runner.model.rope_table_offset(len(request.prompt_token_ids))  # type: ignore[operator]
        if not offset:
            return request.cache_salt
        return f"{request.cache_salt or ''}\0rope-table-{offset}"

    def finish_requests(
        self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        """End requests from outside the step (abort, a stop string the front end found):
        their KV blocks are free for the next step. Unknown ids are ignored."""
        self.scheduler.finish_requests(req_ids, status)
        for req_id in req_ids:
            self._release_lora(req_id)

    def step(self) -> list[RequestUpdate]:
        """Run one batch; an update for every request that made progress."""
        prof = self.profile
        prof.start()
        sched = self.scheduler.schedule()
        prof.lap("schedule")
        result = self.executor.execute(sched)
        prof.lap("execute")
        updates = self.scheduler.update_from_output(sched, result)
        prof.lap("update")
        if prof.enabled:
            execute = prof.phases["execute"][-1]  # type: ignore[attr-defined]
            has_prompt = any(len(s.token_ids) > 1 for s in sched.scheduled)
            num_tokens = sched.total_num_scheduled_tokens
            prof.step(len(sched.scheduled), num_tokens, has_prompt, execute)
        for update in updates:
            if update.finish_reason is not None:
                self._release_lora(update.req_id)
        return updates

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def check_health(self) -> None:
        """WorkerDiedError when a model rank is gone (the engine cannot step)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (idempotent)."""
        self._stop_ranks()

    def waiting_ids(self) -> set[str]:
        return {r.req_id for r in self.scheduler.waiting}

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.pool.reset_prefix_cache()

    def embed(
        self, prompts: list[list[int]], pooling: PoolingConfig | None = None
    ) -> list[EmbeddingRequestOutput]:
        """Pooled embeddings of whole (validated) prompts, in one forward outside the
        scheduler."""
        vectors = self.runner.embed(prompts, pooling or self.pooling).cpu().tolist()
        return [
            EmbeddingRequestOutput(p, EmbeddingOutput(v))
            for p, v in zip(prompts, vectors, strict=True)
        ]

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

    def _release_lora(self, req_id: str) -> None:
        key = self._lora_keys.pop(req_id, None)
        if key is not None and self.lora is not None:
            self.lora.release(key)
