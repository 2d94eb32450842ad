"""Architectures beyond Llama read from GGUF: tiny random models of each architecture that
transformers' GGUF reader supports, written as llama.cpp lays them out (tiny_gguf.py:
Gemma's norms plus one, Phi-3's fused attn_qkv / ffn_up, Qwen-MoE's stacked experts),
generate transformers' `gguf_file=` greedy tokens. Files transformers reads wrongly are
refused by name: Mixtral (architecture "llama" plus experts, read as a dense Llama) and
Phi-3 LongRoPE (its rope factors are not configured)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.layers.moe import FusedExperts
from pinnace.runtime.layers.quantization.experts import QuantizedFusedExperts
from pinnace.runtime.models.gguf_loader import load_gguf
from pinnace.runtime.models.registry import gguf_entries


def _tiny_gguf() -> Any:
    """tests/runtime/tiny_gguf.py (a sibling of the test files, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tiny_gguf.py"
    spec = importlib.util.spec_from_file_location("tiny_gguf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_gguf"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' cache rename
tiny = _tiny_gguf()
PROMPTS = [[1, 5, 9, 2, 40, 41, 42], [7, 3]]
NEW_TOKENS = 8

# GGUF architecture -> (transformers model_type, config beyond the common tiny one, class).
# transformers' GGUF config reads no expert sizes: Qwen-MoE keeps its defaults (moe 1408,
# shared 5632; Qwen3-MoE 768), so the models that must load on both sides use those.
ARCHS: dict[str, tuple[str, dict[str, Any], str]] = {
    # llama.cpp's gemma2 has no output tensor: tied (embedding shrunk, see _random_model).
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 4}, "Gemma2ForCausalLM"),
    "phi3": ("phi3", {"tie_word_embeddings": False}, "Phi3ForCausalLM"),
    "qwen2moe": (
        "qwen2_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
        "Qwen2MoeForCausalLM",
    ),
    "qwen3moe": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 32, "norm_topk_prob": True},
        "Qwen3MoeForCausalLM",
    ),
}


def _random_model(model_type: str, extra: dict[str, Any]) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tiny.TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tiny.BOS_ID,
        eos_token_id=tiny.EOS_ID,
        pad_token_id=tiny.EOT_ID,
        **extra,
    )
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if model_type == "gemma2":
        # Gemma scales the embedding by sqrt(hidden); tied and that large, it drowns the
        # layers and every prompt just repeats its last token. Smaller, the layers count.
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(0.05)
    return model


def _write(path: Path, arch: str, model: Any, quantize: bool = True) -> None:
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tiny.write_hf_model(path, arch, model.config, state, quantize)


def _ours(path: Path) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(path), dtype="float32", kv_cache_memory=2**22)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return llm, [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_gguf_matches_transformers(
    arch: str, tmp_path: Path, hf_greedy: Callable[..., list[int]]
) -> None:
    model_type, extra, architecture = ARCHS[arch]
    path = tmp_path / f"{arch}.gguf"
    _write(path, arch, _random_model(model_type, extra))
    llm, ours = _ours(path)
    assert llm.llm_engine.model_config.architectures == [architecture]
    assert gguf_entries()[arch].architecture == architecture
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    assert ours == expected
    assert len(set(ours[0] + ours[1])) > 2  # a varied continuation, not one token repeated


def test_qwen3_gguf_matches_transformers(
    tmp_path: Path, hf_greedy: Callable[..., list[int]]
) -> None:
    path = tmp_path / "qwen3.gguf"
    # transformers' GGUF config for qwen3 ignores key_length: head_dim stays Qwen3's 128.
    spec = tiny.Tiny(arch="qwen3", heads=2, kv_heads=1, tied=False)
    tiny.write_tiny(path, spec, Q.Q8_0, np.random.default_rng(3))
    llm, ours = _ours(path)
    assert llm.llm_engine.model_config.architectures == ["Qwen3ForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    assert ours == [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]


def test_qwen2_moe_expert_sizes_come_from_the_file(
    tmp_path: Path, hf_greedy: Callable[..., list[int]]
) -> None:
    """Sizes other than transformers' defaults: its GGUF reader cannot build this model,
    ours reads llama.cpp's expert_feed_forward_length keys and equals the source model."""
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "shared_expert_intermediate_size": 48}  # fmt: skip
    source = _random_model("qwen2_moe", extra)
    path = tmp_path / "qwen2moe.gguf"
    _write(path, "qwen2moe", source, quantize=False)  # float32: exactly the source weights
    config = load_gguf(str(path)).config
    assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (32, 48)
    _, ours = _ours(path)
    assert ours == [hf_greedy(source, p, NEW_TOKENS) for p in PROMPTS]


def test_quantized_moe_experts_load_as_int8_one_expert_at_a_time(tmp_path: Path) -> None:
    """A Q8_0 Qwen2-MoE file with quantization="gguf": its stacked experts become int8
    experts (not silently floats) close to the float load's, and the loader hands each
    expert over as its own tensor (dequantized alone, not a view of the [E, out, in] stack)."""
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
             "shared_expert_intermediate_size": 64}  # fmt: skip
    path = tmp_path / "qwen2moe.gguf"
    _write(path, "qwen2moe", _random_model("qwen2_moe", extra))  # Q8_0 experts
    experts = [(n, t) for n, t in load_gguf(str(path)).weights() if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for _, tensor in experts:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    quantized, float_llm = LLM(str(path), dtype="float32", kv_cache_memory=2**22,
                               quantization="gguf"), _ours(path)[0]  # fmt: skip
    ours = [
        m
        for m in quantized.llm_engine.runner.model.modules()
        if isinstance(m, QuantizedFusedExperts)
    ]
    floats = [m for m in float_llm.llm_engine.runner.model.modules() if isinstance(m, FusedExperts)]
    assert len(ours) == len(floats) == 2 and all(m.method == "int8" for m in ours)
    for q, f in zip(ours, floats, strict=True):
        for e in range(4):
            weight = q._weight(q.gate_up_codes, q.gate_up_scale, e)
            torch.testing.assert_close(weight, f.gate_up_proj[e], rtol=0, atol=0.02)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (out,) = quantized.generate([PROMPTS[0]], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS


@pytest.mark.parametrize(
    ("arch", "tensor", "message"),
    [("llama", "blk.0.ffn_gate_inp.weight", r"Mixtral-style.*dense Llama.*safetensors"),
     ("phi3", "rope_factors_long.weight", r"LongRoPE.*safetensors")],
)  # fmt: skip
def test_files_transformers_cannot_read_are_refused_by_name(
    tmp_path: Path, arch: str, tensor: str, message: str
) -> None:
    path = tmp_path / f"{arch}.gguf"
    tensors = [(tensor, np.zeros((2, 256), np.float32), None)]
    tiny.write_gguf(path, tiny.Tiny(arch=arch, layers=1), tensors)
    with pytest.raises(ValueError, match=message):
        load_gguf(str(path))
