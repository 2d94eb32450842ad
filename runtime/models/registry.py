"""Architectures by HF `architectures[0]`, imported lazily, with their GGUF facts.

An entry says where the class lives and how llama.cpp writes the architecture: its GGUF
`general.architecture`, the gguf name table its tensors are named by, and whether the
converter interleaved the rows of q/k (llama.cpp's RoPE kernel wants rotated pairs
adjacent; transformers' LlamaTensorProcessor undoes it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    architecture: str  # HF class name, config.architectures[0]
    module: str  # pinnace.runtime.models.<module>
    model_type: str  # HF config.model_type (what transformers makes of a GGUF file)
    gguf_architecture: str | None = None  # GGUF general.architecture; None: not from GGUF
    gguf_name_table: str | None = None  # gguf's tensor-name table, if not gguf_architecture's
    gguf_qk_permuted: bool = False  # q/k rows interleaved by llama.cpp's converter

    @property
    def gguf_names(self) -> str | None:
        return self.gguf_name_table or self.gguf_architecture


_ENTRIES = (
    ModelEntry("LlamaForCausalLM", "llama", "llama", "llama", gguf_qk_permuted=True),
    # Mistral files are written with llama's tensor names and llama's q/k interleaving.
    ModelEntry(
        "MistralForCausalLM", "mistral", "mistral", "mistral", "llama", gguf_qk_permuted=True
    ),
    ModelEntry("Qwen2ForCausalLM", "qwen2", "qwen2", "qwen2"),
    ModelEntry("Qwen3ForCausalLM", "qwen3", "qwen3", "qwen3"),
    ModelEntry("Gemma2ForCausalLM", "gemma2", "gemma2", "gemma2"),
    ModelEntry("Gemma3ForCausalLM", "gemma3", "gemma3_text", "gemma3"),
    # Phi-3 files keep the checkpoint's fused attn_qkv and ffn_up (gate and up rows).
    ModelEntry("Phi3ForCausalLM", "phi3", "phi3", "phi3"),
    # llama.cpp writes Mixtral as architecture "llama" plus expert tensors, which
    # transformers' GGUF config reads as a dense Llama: not loadable from GGUF.
    ModelEntry("MixtralForCausalLM", "mixtral", "mixtral"),
    # Experts stacked per layer (ffn_{gate,up,down}_exps [E, out, in]), read one by one.
    ModelEntry("Qwen2MoeForCausalLM", "qwen2_moe", "qwen2_moe", "qwen2moe"),
    ModelEntry("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe", "qwen3moe"),
)
_MODELS = {e.architecture: e for e in _ENTRIES}


def supported_architectures() -> list[str]:
    """In registry order: the Llama family first."""
    return list(_MODELS)


def backbone_of(architecture: str) -> str | None:
    """The causal LM whose body a headless `*Model` architecture is ("Qwen2Model" ->
    "Qwen2ForCausalLM"): embedding checkpoints saved without the LM head; else None."""
    base = architecture.removesuffix("Model")
    causal = f"{base}ForCausalLM"
    return causal if base != architecture and causal in _MODELS else None


def entry_for(architecture: str) -> ModelEntry:
    architecture = backbone_of(architecture) or architecture
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )
    return _MODELS[architecture]


def gguf_entries() -> dict[str, ModelEntry]:
    """GGUF general.architecture -> entry, for the architectures loadable from GGUF."""
    return {e.gguf_architecture: e for e in _ENTRIES if e.gguf_architecture is not None}


def entry_for_model_type(model_type: str) -> ModelEntry:
    """The entry for an HF model_type (a llama-architecture GGUF named "Mistral" is one)."""
    found = [e for e in _ENTRIES if e.model_type == model_type]
    if not found:
        raise ValueError(f"model type {model_type!r} is not supported.")
    return found[0]


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    entry = entry_for((architectures or ["<none>"])[0])
    module = importlib.import_module(f"pinnace.runtime.models.{entry.module}")
    cls: type[nn.Module] = getattr(module, entry.architecture)
    return cls


# vLLM's rule for `--runner auto`: these architecture names are embedding models.
POOLING_SUFFIXES = ("ForTextEncoding", "EmbeddingModel", "Model")
# (vLLM also lists "RewardModel": none is registered here — entry_for refuses one — and a
# reward head's output is a score, not an embedding.)


def resolve_runner(
    runner: str, convert: str, architectures: list[str] | None, has_pooling_config: bool
) -> str:
    """ "generate" or "pooling" for EngineConfig's runner/convert and the checkpoint.

    auto: pooling when asked to convert to an embedding model, when the architecture is
    named as one (vLLM's suffixes), or when the folder is a sentence-transformers model
    (its modules.json names a pooling); generate otherwise.
    """
    architecture = (architectures or [""])[0]
    if runner == "generate" and backbone_of(architecture) is not None:
        raise ValueError(
            f"{architecture} is a model body without its LM head: it serves embeddings "
            "(runner pooling), not generation."
        )
    if runner != "auto":
        return runner
    named_pooling = architecture.endswith(POOLING_SUFFIXES)
    return "pooling" if convert == "embed" or named_pooling or has_pooling_config else "generate"
