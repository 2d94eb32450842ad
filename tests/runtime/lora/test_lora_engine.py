"""Multi-LoRA through the offline API: parity with transformers + peft, mixed batches,
slot and host-cache swapping, prefix-cache isolation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # HF past_key_values rename

NEW_TOKENS = 12
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
NAMES = ["sql", "chat", "poem"]


def make_llm(base: Path, **options: Any) -> LLM:
    options = {"max_loras": 4, **options}
    return LLM(str(base), dtype="float32", kv_cache_memory=64 * 2**20, enable_lora=True, **options)


def lora_requests(adapter_dirs: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(adapter_dirs[name])) for i, name in enumerate(NAMES)}


def tokens(outs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(lora_base: Path) -> LLM:
    return make_llm(lora_base)


@pytest.fixture(scope="module")
def alone(
    llm: LLM, adapter_dirs: dict[str, Path], lora_prompts: list
) -> dict[str | None, list[list[int]]]:
    """Each group (None: the base model) run alone over the four prompts."""
    requests = lora_requests(adapter_dirs)
    return {
        g: tokens(llm.generate(lora_prompts, PARAMS, use_tqdm=False, lora_request=requests.get(g)))
        for g in [None, *NAMES]
    }


def test_each_adapter_matches_transformers_peft(alone: dict, peft_reference: dict) -> None:
    assert alone[None] == peft_reference[None]
    for name in NAMES:
        # Every adapter changes the output (so matching peft is not matching the base).
        assert peft_reference[name] != peft_reference[None]
        assert alone[name] == peft_reference[name], name


def test_mixed_batch_equals_each_group_alone(
    llm: LLM, adapter_dirs: dict[str, Path], lora_prompts: list, alone: dict
) -> None:
    requests = lora_requests(adapter_dirs)
    groups: list[str | None] = [None, *NAMES]
    # 16 requests, interleaved: base, sql, chat, poem, base, sql, ...
    order = [(groups[i % 4], i // 4) for i in range(16)]
    prompts = [lora_prompts[p] for _, p in order]
    loras = [requests[g] if g else None for g, _ in order]
    mixed = tokens(llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras))
    assert mixed == [alone[g][p] for g, p in order]


def test_two_slots_three_adapters_swap_and_stay_correct(
    lora_base: Path, adapter_dirs: dict[str, Path], lora_prompts: list, peft_reference: dict
) -> None:
    # 2 device slots and 2 host copies for 3 adapters in flight: both caches must swap.
    llm = make_llm(lora_base, max_loras=2, max_cpu_loras=2)
    engine = llm.llm_engine
    adapters_per_step: list[int] = []
    schedule = engine.scheduler.schedule

    def spy() -> Any:
        out = schedule()
        adapters_per_step.append(len({s.lora_id for s in out.scheduled if s.lora_id}))
        return out

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    requests = lora_requests(adapter_dirs)
    order = [(NAMES[i % 3], i % 4) for i in range(12)]
    outs = llm.generate(
        [lora_prompts[p] for _, p in order],
        PARAMS,
        use_tqdm=False,
        lora_request=[requests[n] for n, _ in order],
    )
    assert tokens(outs) == [peft_reference[n][p] for n, p in order]
    assert max(adapters_per_step) == 2  # both slots used, never more
    assert engine.lora is not None
    assert engine.lora.slots.num_evictions >= 1  # a slot was swapped
    assert engine.lora.slots.num_loads == 2 + engine.lora.slots.num_evictions
    assert engine.lora.num_disk_loads >= 1  # a host copy was evicted and read again


def test_prefix_cache_is_isolated_per_adapter(
    llm: LLM, adapter_dirs: dict[str, Path], lora_prompts: list, peft_reference: dict
) -> None:
    requests = lora_requests(adapter_dirs)
    prompt = lora_prompts[3]  # 40 tokens: 2 full blocks of 16 can be cached
    llm.llm_engine.reset_prefix_cache()
    first = {}
    for name in [None, "sql", "chat"]:
        (out,) = llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=requests.get(name))
        first[name] = out
        assert out.num_cached_tokens == 0, f"{name} reused another adapter's KV"
        assert out.outputs[0].token_ids == peft_reference[name][3]
    for name in [None, "sql", "chat"]:
        (out,) = llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=requests.get(name))
        assert out.num_cached_tokens == 32, name  # its own blocks are reused
        assert out.outputs[0].token_ids == peft_reference[name][3]


def test_an_adapter_removed_while_running_finishes_its_requests(
    llm: LLM, adapter_dirs: dict[str, Path], lora_prompts: list, peft_reference: dict
) -> None:
    engine = llm.llm_engine
    assert engine.lora is not None
    num_held = engine.lora.num_held
    request = LoRARequest("sql-late", 42, str(adapter_dirs["sql"]))
    engine.add_lora(request)
    assert 42 in engine.list_loras()
    engine.add_request("r", lora_prompts[1], PARAMS, lora_request=request)
    engine.step()
    assert engine.remove_lora(42)
    assert 42 not in engine.list_loras()
    assert not engine.remove_lora(42)
    assert engine.lora.num_held == num_held + 1  # still in use
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and final.outputs[0].token_ids == peft_reference["sql"][1]
    assert engine.lora.num_held == num_held  # dropped with its last request


def test_an_id_is_one_adapter(llm: LLM, adapter_dirs: dict[str, Path]) -> None:
    llm.llm_engine.add_lora(LoRARequest("x", 77, str(adapter_dirs["sql"])))
    with pytest.raises(ValueError, match="lora_int_id 77 is already used by adapter 'x'"):
        llm.generate(
            [1, 2, 3], PARAMS, lora_request=LoRARequest("y", 77, str(adapter_dirs["chat"]))
        )
    assert llm.llm_engine.num_unfinished_requests() == 0


def test_lora_needs_enable_lora(lora_base: Path, adapter_dirs: dict[str, Path]) -> None:
    llm = LLM(str(lora_base), dtype="float32", kv_cache_memory=16 * 2**20)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([1, 2], PARAMS, lora_request=LoRARequest("sql", 1, str(adapter_dirs["sql"])))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_loras": 0}, "max_loras must be a positive integer"),
        ({"max_lora_rank": -1}, "max_lora_rank must be a positive integer"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2) must be at least max_loras (4)"),
    ],
)
def test_lora_options_are_validated(lora_base: Path, options: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        LLM(str(lora_base), enable_lora=True, **options)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (dict(lora_name="", lora_int_id=1, lora_path="/a"), "non-empty lora_name"),
        (dict(lora_name="a", lora_int_id=0, lora_path="/a"), "positive integer"),
        (dict(lora_name="a", lora_int_id=1, lora_path=""), "needs a lora_path"),
    ],
)
def test_lora_request_is_validated(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LoRARequest(**bad)


def test_qwen3_all_seven_targets_match_transformers_peft(
    make_tiny_model: Any, tmp_path: Path, lora_prompts: list, save_adapter: Any, hf_greedy: Any
) -> None:
    # Qwen3: head_dim 32 (so q is 128 wide on a 64-wide model) and q/k norms after qkv.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_model("Qwen3ForCausalLM")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    path = save_adapter(base, tmp_path / "all", seed=3, r=8, lora_alpha=32,
                        use_rslora=True, target_modules=targets)  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, path).eval()
    prompts = lora_prompts[1:3]
    expected = [hf_greedy(peft_model, p, NEW_TOKENS) for p in prompts]
    llm = make_llm(base, max_lora_rank=8)
    outs = llm.generate(
        prompts, PARAMS, use_tqdm=False, lora_request=LoRARequest("all", 1, str(path))
    )
    assert tokens(outs) == expected
    assert tokens(llm.generate(prompts, PARAMS, use_tqdm=False)) != expected


@pytest.mark.parametrize("method", ["ngram", "draft-model"])
def test_speculation_keeps_each_adapters_tokens(
    lora_base: Path,
    adapter_dirs: dict[str, Path],
    lora_prompts: list,
    alone: dict,
    make_draft_model: Any,
    method: str,
) -> None:
    """Adapters are applied to the target only: the draft (or n-gram lookup) proposes
    from the base model, and verification by the adapted target keeps its tokens."""
    spec: dict[str, Any] = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    if method == "draft-model":
        spec = {"model": str(make_draft_model("LlamaForCausalLM")), "num_speculative_tokens": 3}
    llm = make_llm(lora_base, speculative_config=spec)
    requests = lora_requests(adapter_dirs)
    order = [([None, *NAMES][i % 4], i // 2 % 4) for i in range(8)]
    prompts = [lora_prompts[p] for _, p in order]
    loras = [requests[g] if g else None for g, _ in order]
    mixed = tokens(llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras))
    assert mixed == [alone[g][p] for g, p in order]
    stats = llm.llm_engine.stats().spec_decoding
    assert stats.num_draft_tokens > 0
    if method == "draft-model":
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
