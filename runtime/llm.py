"""`LLM`: the embeddable offline API (vLLM's shape)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pinnace.runtime.beam_search import (
    BeamSearchInstance,
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
)
from pinnace.runtime.chat_template import apply_chat_template
from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.engine.mp_llm_engine import MPLLMEngine
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import EmbeddingRequestOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.worker.pooler import PoolingConfig

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Generate text offline: `LLM(model="path").generate(["Hello"], SamplingParams())`.

    Keyword arguments are EngineConfig fields (vLLM's names: dtype, max_model_len,
    max_num_seqs, max_num_batched_tokens, block_size, enable_prefix_caching, seed,
    gpu_memory_utilization, kv_cache_memory, enable_lora, max_loras, max_lora_rank,
    max_cpu_loras, runner, convert, ...). runner="pooling" (or a checkpoint that
    `runner="auto"` recognises as an embedding model) serves `embed` only; "generate"
    serves `generate`, `chat` and `beam_search` only.

    `enable_multiprocessing=True` runs the engine core (scheduler and model) in a process
    of its own, as `pinnace serve` does, while this process tokenizes, detokenizes and
    checks stop strings, overlapping the core's next step (vLLM's name for the choice;
    the default keeps everything in this process). `shutdown()` stops that process; it
    also stops when the `LLM` is collected or the interpreter exits.
    """

    def __init__(self, model: str, *, enable_multiprocessing: bool = False, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        config = EngineConfig(model=model, **kwargs)
        self.llm_engine: LLMEngine | MPLLMEngine = (
            MPLLMEngine(config) if enable_multiprocessing else LLMEngine(config)
        )
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine-core process of `enable_multiprocessing=True`, or the worker
        ranks of an in-process engine with more than one (else nothing)."""
        if isinstance(self.llm_engine, MPLLMEngine):
            self.llm_engine.shutdown()
        else:
            self.llm_engine.core.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.llm_engine.tokenizer

    def embed(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        pooling: str | None = None,
        normalize: bool | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt: the final hidden states pooled ("last", "mean" or
        "cls"; by default the folder's sentence-transformers config, else last-token) and
        L2-normalised unless `normalize=False`."""
        default = self.llm_engine.pooling
        config = PoolingConfig(
            pooling or default.method, default.normalize if normalize is None else normalize
        )
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts)
        return self.llm_engine.embed(batch, config)  # type: ignore[arg-type]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Returns one RequestOutput per prompt, in input order.

        `lora_request`: one adapter for every prompt, or one per prompt (None: the base
        model); the engine needs enable_lora=True.
        """
        self.llm_engine.require_runner("generate")
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        loras = _as_lora_list(lora_request, len(prompt_list))
        # Validate everything first: a bad prompt must not leave half a batch queued.
        resolved = [_unpack(p) for p in prompt_list]
        engine = self.llm_engine
        for prompt, sp in zip(resolved, params, strict=True):
            engine.validate(engine.tokenize(prompt), sp)
            if sp.structured_outputs is not None:
                try:
                    engine.check_constraint(sp.structured_outputs)
                except ValueError as exc:
                    raise ValueError(f"structured_outputs: {exc}") from exc
        for adapter in dict.fromkeys(r for r in loras if r is not None):
            engine.add_lora(adapter)  # reads and checks the adapter once, up front
        ids = [f"gen-{next(self._counter)}" for _ in resolved]
        for req_id, prompt, sp, lora in zip(ids, resolved, params, loras, strict=True):
            engine.add_request(req_id, prompt, sp, lora_request=lora)
        return self._run(ids, use_tqdm)

    def beam_search(
        self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams
    ) -> list[BeamSearchOutput]:
        """Beam search per prompt (runtime/beam_search.py); sequences best first, each
        with its text and cumulative logprob."""
        engine = self.llm_engine
        engine.require_runner("generate")
        params.check_logprobs_room(engine.eos_token_ids, engine.config.max_logprobs)
        tokenized = [engine.tokenize(_unpack(p)) for p in _as_prompt_list(prompts)]
        instances = [BeamSearchInstance([BeamSearchSequence(t, len(t))]) for t in tokenized]
        step = params.step_params(engine.eos_token_ids)
        for _ in range(params.max_tokens):
            live = [(inst, b) for inst in instances for b in inst.beams]
            if not live:
                break
            outs = self.generate([{"prompt_token_ids": b.tokens} for _, b in live], step, False)
            for inst in instances:
                tops = [
                    (out.outputs[0].logprobs or [{}])[0]
                    for (owner, _), out in zip(live, outs, strict=True)
                    if owner is inst
                ]
                if tops:
                    inst.step(tops, params, engine.eos_token_ids)
        results = [inst.result(params) for inst in instances]
        tokenizer = self.get_tokenizer()
        for result in results:
            for seq in result.sequences:
                seq.text = str(tokenizer.decode(seq.output_tokens, skip_special_tokens=True))
        return results

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        if not messages:
            raise ValueError("messages must not be empty.")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts: list[Prompt] = [
            self.apply_chat_template(c, chat_template, add_generation_prompt) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def apply_chat_template(
        self,
        conversation: list[Message],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt token ids of one conversation (the server's chat routes use the same
        function, so both build identical prompts)."""
        return apply_chat_template(
            self.get_tokenizer(), conversation, chat_template, add_generation_prompt
        )

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finals: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(finals) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        finals[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in finals])
            raise
        finally:
            bar.close()
        return [finals[i] for i in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items: list[Any] = list(prompts)
    if not items:
        raise ValueError("prompts must not be empty.")
    if all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _unpack(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt)}.")


def _as_lora_list(
    lora: LoRARequest | Sequence[LoRARequest | None] | None, num: int
) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * num
    loras = list(lora)
    if len(loras) != num:
        raise ValueError(f"got {len(loras)} LoRA requests for {num} prompts.")
    return loras


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, num: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num
    if isinstance(params, SamplingParams):
        return [params] * num
    params = list(params)
    if len(params) != num:
        raise ValueError(f"got {len(params)} SamplingParams for {num} prompts.")
    return params
