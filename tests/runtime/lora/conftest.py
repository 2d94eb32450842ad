"""Three random PEFT adapters for the tiny Llama, and transformers + peft as the reference
(greedy decoding by `hf_greedy`, ../conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

NEW_TOKENS = 12


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    lora_config: dict[str, Any]


# Different ranks and targets (packed q/k/v and gate/up, partial and whole); one rslora.
ADAPTERS = [
    AdapterSpec("sql", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])),
    AdapterSpec(
        "chat",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "down_proj"]),
    ),
    AdapterSpec(
        "poem",
        dict(r=16, lora_alpha=8, target_modules=["v_proj", "o_proj", "up_proj", "down_proj"]),
    ),
]


def save_peft_adapter(base: Path, out: Path, seed: int, **lora_config: Any) -> Path:
    """A PEFT adapter with random A and B (B is zero at PEFT's default init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_config))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def save_adapter() -> Callable[..., Path]:
    """save_adapter(base, out, seed, **LoraConfig fields) -> a PEFT adapter folder."""
    return save_peft_adapter


@pytest.fixture(scope="session")
def lora_base(make_tiny_model: Callable[[str], Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="session")
def adapter_dirs(lora_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        a.name: save_peft_adapter(lora_base, root / a.name, seed=i, **a.lora_config)
        for i, a in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="session")
def lora_prompts() -> list[list[int]]:
    """Four prompts of 3 to 40 tokens (the two longest share a 20-token prefix)."""
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 9, 24, 40]
    prompts = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in lengths]
    prompts[3][:20] = prompts[2][:20]
    return prompts


@pytest.fixture(scope="session")
def peft_reference(
    lora_base: Path,
    adapter_dirs: dict[str, Path],
    lora_prompts: list[list[int]],
    hf_greedy: Callable[..., list[int]],
) -> dict[str | None, list[list[int]]]:
    """adapter name (None: base) -> transformers + peft greedy tokens for each prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lora_base, dtype=torch.float32)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    refs: dict[str | None, list[list[int]]] = {}
    with model.disable_adapter():
        refs[None] = [hf_greedy(model, p, NEW_TOKENS) for p in lora_prompts]
    for name in names:
        model.set_adapter(name)
        refs[name] = [hf_greedy(model, p, NEW_TOKENS) for p in lora_prompts]
    return refs


@pytest.fixture(scope="session")
def bad_adapter_dirs(lora_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters the engine must refuse, by what is wrong with them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad-adapters")
    out = {
        "rank": save_peft_adapter(lora_base, root / "rank", 0, r=32, target_modules=["q_proj"]),
        "embed": save_peft_adapter(
            lora_base, root / "embed", 0, r=4, target_modules=["embed_tokens", "q_proj"]
        ),
        "dora": save_peft_adapter(
            lora_base, root / "dora", 0, r=4, use_dora=True, target_modules=["q_proj"]
        ),
    }
    # Made for another base model (hidden size 32, not 64).
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, num_hidden_layers=2, **small))
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(other, config).save_pretrained(root / "shape")
    out["shape"] = root / "shape"
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    return out


@pytest.fixture(scope="session")
def start_lora_server(serve_app: Callable[..., Any]) -> Callable[..., Any]:
    """start_lora_server(model, settings, **engine options) -> a started ServerThread
    (../conftest.py)."""
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings, build_app

    def start(model: Path, settings: dict[str, Any], **options: Any) -> Any:
        options = {"dtype": "float32", "kv_cache_memory": 64 * 2**20, **options}
        # As `pinnace serve` runs: the engine core in a process of its own.
        config = EngineConfig(model=str(model), **options)
        return serve_app(build_app(config, ServerSettings(**settings)))

    return start
