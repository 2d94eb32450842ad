"""GPU tests run offline (hack/gpu-check.sh): a tokenizer trained here instead of the
SmolLM2 package's, and tiny models with FlashInfer-sized heads (head_dim 64)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# head_dim 64 (FlashInfer's smallest), 2 KV heads for 4 query heads (GQA)
GPU_TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,
)


def train_tokenizer(out: Path) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello, my name is Pinnace.", "The capital of France is Paris.", "1 2 3 4 5"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Overrides tests/conftest.py's (the SmolLM2 package is not on a GPU check machine)."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def make_gpu_model(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Callable[..., Path]:
    """make(arch, **config overrides) -> a random bf16-ready HF folder with head_dim 64."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extras: dict[str, dict[str, Any]] = {
        "LlamaForCausalLM": dict(model_type="llama"),
        "Qwen2ForCausalLM": dict(model_type="qwen2"),
        "MistralForCausalLM": dict(model_type="mistral", sliding_window=24),
        "Gemma2ForCausalLM": dict(
            model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=24,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        ),
        "Gemma3ForCausalLM": dict(
            model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64, sliding_window=24,
            layer_types=["sliding_attention", "full_attention"],
        ),
    }  # fmt: skip

    def make(arch: str, **overrides: Any) -> Path:
        extra = dict(extras[arch])
        config = AutoConfig.for_model(
            extra.pop("model_type"), vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            architectures=[arch], **{**GPU_TINY, **extra, **overrides},
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = tmp_path_factory.mktemp(arch)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    return make
