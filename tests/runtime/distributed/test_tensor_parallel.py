"""Tensor parallelism on CPU: 2 gloo ranks give TP=1's greedy tokens, token for token.

The module keeps ONE worker process (rank 1) for all its engines (spawning a rank costs
seconds here): this process is rank 0 and each TP=2 engine's GroupExecutor sends the
worker its config (multiproc.run_worker). `pinnace serve` tests cover the executor that
spawns its own ranks. float32, so sums split over ranks round like the whole.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.config import EngineConfig
from pinnace.runtime.distributed.parallel_state import (
    ParallelGroup,
)
from pinnace.runtime.engine import engine_core
from pinnace.runtime.engine.core_loop import CoreLoop
from pinnace.runtime.executor.executor import WorkerDiedError
from pinnace.runtime.executor.multiproc import GroupExecutor
from pinnace.runtime.executor.step_messages import StepMessage

PROMPTS: list[Any] = [
    "The quick brown fox jumps over the lazy dog and then",
    "The quick brown fox jumps over the lazy dog, so the",  # shares a cached prefix
    "In a hole in the ground there lived",
    list(range(5, 70)),  # longer than the step budget: chunked prefill
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# A small step budget (chunked prefill) and few blocks (preemption when all run at once).
ENGINE: dict[str, Any] = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=14,
                              block_size=8, max_model_len=96)  # fmt: skip
DENSE = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
         "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"]  # fmt: skip
MOE = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.fixture(scope="module")
def group(spawned_group: Any) -> Iterator[tuple[ParallelGroup, BaseProcess]]:
    """Rank 0 here, rank 1 in a spawned worker that serves every engine of the module."""
    config = EngineConfig(model="unused", tensor_parallel_size=2, dtype="float32")
    with spawned_group(config) as group:
        yield group


@pytest.fixture(scope="module")
def tp2(
    group: tuple[ParallelGroup, Any],
) -> Callable[..., LLM]:
    """LLM(model, tensor_parallel_size=2, ...) on the module's group."""
    rank0, proc = group

    def make(model: Path, **kwargs: Any) -> LLM:
        patch = pytest.MonkeyPatch()
        patch.setattr(engine_core, "make_executor", lambda c: GroupExecutor(c, rank0, [proc]))
        try:
            return LLM(str(model), tensor_parallel_size=2, **kwargs)
        finally:
            patch.undo()

    return make


@pytest.fixture
def steps_sent(group: tuple[ParallelGroup, Any], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every StepMessage the driver broadcasts, with its pickled size: (message, bytes)."""
    rank0, sent = group[0], []
    real = rank0.broadcast_object

    def record(obj: object = None) -> Any:
        if isinstance(obj, StepMessage):
            sent.append((obj, len(pickle.dumps(obj))))
        return real(obj)

    monkeypatch.setattr(rank0, "broadcast_object", record)
    return sent


def _generate(llm: LLM, prompts: list[Any] = PROMPTS) -> list[list[int]]:
    try:
        outputs = llm.generate(prompts, GREEDY)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """One KV head (replicated on both ranks), an odd vocabulary (a padded last shard)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 1,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("odd_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_odd_vocab_one_kv_head_chunked_prefix_preempted(
    odd_llama: Path, tp2: Callable[..., LLM], steps_sent: list[Any]
) -> None:
    tp1 = LLM(str(odd_llama), **ENGINE)
    expected = _generate(tp1)
    llm = tp2(odd_llama, **ENGINE)
    assert llm.llm_engine.core.executor.world_size == 2
    assert _generate(llm) == expected
    stats = llm.llm_engine.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # both paths ran
    # The worker got each request's prompt once per admission: again after a preemption.
    sent_new = [d.req_id for msg, _ in steps_sent for d in msg.new]
    preempted = [r for msg, _ in steps_sent for r in msg.preempted_req_ids]
    assert preempted and len(set(sent_new)) == len(PROMPTS)
    assert all(sent_new.count(r) == 1 + preempted.count(r) for r in sent_new)
    # Each rank's weights: half, plus the replicated norms and the padded vocabulary row.
    full, half = tp1.llm_engine.parts.weight_bytes, llm.llm_engine.parts.weight_bytes
    assert 0.5 * full <= half < 0.53 * full


def test_step_messages_do_not_grow_with_context(
    odd_llama: Path, tp2: Callable[..., LLM], steps_sent: list[Any]
) -> None:
    """The same batch decoding at context 32 and 256: the same bytes per step (before
    the deltas, every step pickled each request's whole prompt, output and block table)."""
    engine = dict(ENGINE, num_kv_blocks=160, max_model_len=280, max_num_batched_tokens=1024)
    llm = tp2(odd_llama, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    decode_bytes = []
    for context in (32, 256):
        prompts = [[5 + (i * 7 + j) % 300 for j in range(context)] for i in range(4)]
        steps_sent.clear()
        llm.generate(prompts, params)
        decode = [size for msg, size in steps_sent if msg.scheduled and not msg.new]
        assert len(decode) >= 6
        decode_bytes.append(max(decode))
    llm.shutdown()
    small, large = decode_bytes
    assert large <= small + 16, decode_bytes  # 4 x 224 more tokens would be >= 2 kB


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_every_architecture(
    arch: str, make_tiny_model: Callable[[str], Path], tp2: Callable[..., LLM]
) -> None:
    model = make_tiny_model(arch)
    prompts = PROMPTS[2:]  # a short and a chunked prompt
    expected = _generate(LLM(str(model), **ENGINE), prompts)
    assert _generate(tp2(model, **ENGINE), prompts) == expected


def test_int8_tp2_equals_int8_tp1(
    make_tiny_model: Callable[[str], Path], tp2: Callable[..., LLM]
) -> None:
    model = make_tiny_model("Qwen2ForCausalLM")  # biases on q/k/v: split with the rows
    int8 = dict(ENGINE, quantization="int8")
    tp1 = LLM(str(model), **int8)
    expected = _generate(tp1, PROMPTS[2:])
    llm = tp2(model, **int8)
    assert _generate(llm, PROMPTS[2:]) == expected
    assert llm.llm_engine.parts.weight_bytes < 0.55 * tp1.llm_engine.parts.weight_bytes


def test_moe_shards_experts_and_int8_scales_whole_rows(
    make_tiny_model: Callable[[str], Path], tp2: Callable[..., LLM]
) -> None:
    """Qwen2-MoE (routed experts, a shared expert, a dense layer) in int8: every expert's
    down rows get the scales of the whole rows, so TP=2 quantizes exactly as TP=1."""
    model = make_tiny_model("Qwen2MoeForCausalLM")
    int8 = dict(ENGINE, quantization="int8")
    tp1 = LLM(str(model), **int8)
    expected = _generate(tp1, PROMPTS[2:])
    llm = tp2(model, **int8)
    experts = llm.llm_engine.parts.runner.model.model.layers[0].mlp.experts
    assert experts.down_codes.shape[-1] == experts.intermediate == 32 // 2  # I/tp columns
    assert _generate(llm, PROMPTS[2:]) == expected
    assert llm.llm_engine.parts.weight_bytes < 0.55 * tp1.llm_engine.parts.weight_bytes


def test_a_failed_step_breaks_the_group_for_good(
    make_tiny_model: Callable[[str], Path],
    tp2: Callable[..., LLM],
    group: tuple[ParallelGroup, Any],
) -> None:
    """The driver's step fails once (here after the worker's forward, so the module's
    ranks stay paired for the next tests): the core must die, not step on out of step."""
    llm = tp2(make_tiny_model("LlamaForCausalLM"), **ENGINE)
    core = llm.llm_engine.core
    runner = core.executor.parts.runner
    real = runner.execute

    def fail_once(sched: Any) -> Any:
        real(sched)
        runner.execute = real  # type: ignore[method-assign]
        raise RuntimeError("injected driver fault")

    runner.execute = fail_once  # type: ignore[method-assign]
    llm.llm_engine.add_request("r", "Hello", GREEDY)
    loop = CoreLoop(core, lambda event: None)
    with pytest.raises(WorkerDiedError, match="injected driver fault"):
        loop.step()  # not caught as one failed step: whoever runs the loop reports it dead
    # The worker is alive, and the fault is gone: the engine still refuses to go on.
    with pytest.raises(WorkerDiedError, match="cannot step any more"):
        core.check_health()
    with pytest.raises(WorkerDiedError, match="cannot step any more"):
        llm.generate(["Hello"], GREEDY)
    llm.shutdown()  # a broken group's worker is not told (it may wait in a collective)
    group[0].broadcast_object(None)  # this test knows it waits: end its engine
