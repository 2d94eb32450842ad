"""Adapter folders: precise errors for what can't be served; PEFT's math, packed; the
batched LoRALinear against a per-token reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pinnace.runtime import LLM, LoRARequest
from pinnace.runtime.layers.linear import PackedLinear, can_pack
from pinnace.runtime.lora.adapter import load_adapter
from pinnace.runtime.lora.context import LoRABatch, lora_batch_context
from pinnace.runtime.lora.layers import LoRALinear
from pinnace.runtime.lora.targets import TargetModule, model_spec

# transformers' deprecations, and peft's notes on the embedding-targeting adapter.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def llm(lora_base: Path) -> LLM:
    return LLM(str(lora_base), dtype="float32", kv_cache_memory=16 * 2**20, enable_lora=True)


@pytest.mark.parametrize(
    ("bad", "error", "needle"),
    [
        ("rank", ValueError, "has rank 32 (at model.layers.0.self_attn.q_proj), above "
         "max_lora_rank=16; start the engine with a larger max_lora_rank (--max-lora-rank)"),
        ("embed", ValueError, "targets embed_tokens; LoRA serving supports only q_proj, k_proj"),
        ("dora", ValueError, "uses DoRA adapters, which LoRA serving does not support"),
        ("shape", ValueError, "does not fit this base model at model.layers.0.self_attn.q_proj: "
         "lora_A is (4, 32) and lora_B (32, 4), expected (4, 64) and (64, 4)"),
        ("empty", FileNotFoundError, "it has no adapter_config.json"),
    ],
)  # fmt: skip
def test_incompatible_adapters_are_refused_precisely(
    llm: LLM, bad_adapter_dirs: dict[str, Path], bad: str, error: type, needle: str
) -> None:
    request = LoRARequest(bad, 1, str(bad_adapter_dirs[bad]))
    with pytest.raises(error) as err:
        llm.generate([1, 2, 3], lora_request=request, use_tqdm=False)
    assert needle in str(err.value)
    assert f"LoRA adapter {bad!r}" in str(err.value) or error is FileNotFoundError
    assert llm.llm_engine.list_loras() == set()  # nothing half-registered


def test_missing_folder_and_broken_files(
    llm: LLM, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="No adapter found for /no/such"):
        llm.llm_engine.load_lora(LoRARequest("x", 1, "/no/such"))
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["sql"], broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        llm.llm_engine.load_lora(LoRARequest("x", 1, str(broken)))
    shutil.copy(adapter_dirs["sql"] / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"it has no adapter_model\.safetensors"):
        llm.llm_engine.load_lora(LoRARequest("x", 1, str(broken)))


def test_rank_and_alpha_patterns_follow_peft(lora_base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lora_base, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
    )  # fmt: skip
    peft_model = get_peft_model(hf, config)
    peft_model.save_pretrained(tmp_path)
    ours = LLM(str(lora_base), dtype="float32", kv_cache_memory=16 * 2**20)
    spec = model_spec(ours.llm_engine.runner.model)
    adapter = load_adapter(LoRARequest("p", 1, str(tmp_path)), spec, 16, torch.float32)
    a, bt = adapter.weights[(1, "self_attn.qkv_proj")]
    x = torch.randn(5, spec.modules[0].in_features)
    delta = (x @ a.T) @ bt  # [5, q + 2kv]: q rows, then k (untouched), then v
    attn = peft_model.base_model.model.model.layers[1].self_attn
    with torch.no_grad():
        for part, rows in (
            ("q_proj", spec.modules[0].rows(0)),
            ("v_proj", spec.modules[0].rows(2)),
        ):
            layer = getattr(attn, part)
            expected = (
                layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
            )
            torch.testing.assert_close(delta[:, rows], expected)
        assert delta[:, spec.modules[0].rows(1)].abs().max() == 0  # k is not targeted


def _target() -> TargetModule:
    return TargetModule("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), 16, (16, 8, 8))


@pytest.mark.parametrize("packed", [False, True])
def test_lora_linear_matches_a_per_token_reference(packed: bool) -> None:
    dtype = torch.bfloat16 if packed else torch.float32
    if packed and not can_pack(torch.device("cpu"), dtype):
        pytest.skip("CPU without oneDNN bfloat16 support (avx512_bf16)")
    torch.manual_seed(0)
    linear = nn.Linear(16, 32, bias=True).to(dtype)
    base: nn.Module = PackedLinear(linear) if packed else linear
    layer = LoRALinear(base, _target(), max_loras=3, max_lora_rank=4, dtype=dtype, device="cpu")
    # Slot 0: rank 2 on q and v (k = 4 rows); slot 2: rank 4 on k only; slot 1: not us.
    weights = {
        0: (torch.randn(4, 16), torch.randn(4, 32)),
        2: (torch.randn(4, 16), torch.randn(4, 32)),
    }
    for slot, (a, bt) in weights.items():
        layer.set_slot(slot, (a.to(dtype), bt.to(dtype)))
    x = torch.randn(7, 16).to(dtype)
    token_slots = [-1, 2, 2, 2, 0, 0, 1]  # rows as the runner orders them: by slot
    batch = LoRABatch([(2, 1, 4), (0, 4, 6), (1, 6, 7)])
    with torch.inference_mode(), lora_batch_context(batch):
        got = layer(x).float()
    expected = linear(x).float()
    for t, slot in enumerate(token_slots):
        if slot in weights:
            a, bt = weights[slot]
            expected[t] += (x[t].float() @ a.T) @ bt
    tolerance = dict(atol=0.1, rtol=0.02) if packed else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)
    with torch.inference_mode():  # outside a LoRA batch: the base layer alone
        torch.testing.assert_close(layer(x), base(x))


def test_the_step_is_ordered_by_adapter_slot(
    lora_base: Path, adapter_dirs: dict[str, Path]
) -> None:
    from pinnace.runtime.core.outputs import ScheduledRequest
    from pinnace.runtime.sampling_params import SamplingParams

    llm = LLM(str(lora_base), kv_cache_memory=16 * 2**20, enable_lora=True, max_loras=2)
    manager = llm.llm_engine.lora
    assert manager is not None
    sql = manager.acquire(LoRARequest("sql", 11, str(adapter_dirs["sql"])))
    chat = manager.acquire(LoRARequest("chat", 12, str(adapter_dirs["chat"])))
    plan = [("a", sql, 3), ("b", 0, 1), ("c", chat, 2), ("d", sql, 1), ("e", 0, 4)]
    scheduled = [
        ScheduledRequest(rid, [1] * n, 0, [0], SamplingParams(), True, lora_id=key)
        for rid, key, n in plan
    ]
    ordered, batch = manager.prepare(scheduled)
    by_slot = sorted(
        [("sql", manager.slots.slot_of(sql)), ("chat", manager.slots.slot_of(chat))],
        key=lambda p: p[1] or 0,
    )
    groups = {"sql": ["a", "d"], "chat": ["c"]}
    assert [s.req_id for s in ordered] == ["b", "e"] + [
        r for name, _ in by_slot for r in groups[name]
    ]
    assert batch is not None
    sizes = {"sql": 4, "chat": 2}
    start, expected = 5, []
    for name, slot in by_slot:
        expected.append((slot, start, start + sizes[name]))
        start += sizes[name]
    assert batch.segments == expected
    for key in (sql, chat):
        manager.release(key)
    assert manager.prepare(scheduled[1:2]) == (scheduled[1:2], None)  # base only: no batch
