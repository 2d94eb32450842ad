"""The model contract: what every architecture implements, and the facts it declares.

A model class states its weight facts as class data; the loader, the quantized-weight
router, GGUF 4-bit selection and LoRA read them from the class, never from tables of their
own:

    packed_modules_mapping   our fused module -> the HF modules stacked in it, in row order
                             (vLLM v1's shape): {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    expert_params_mapping    per-expert HF module -> (our stacked expert tensor, part):
                             {"gate_proj": ("gate_up_proj", 0), "down_proj": ("down_proj", 0)}
    lora_target_modules      module paths inside a decoder layer an adapter may wrap

and implements (`CausalLM` below):

    forward(input_ids [T], positions [T])   -> hidden [T, hidden]  (a pipeline stage
                                               after the first: + the received hidden)
    compute_logits(hidden [N, hidden])      -> float32 logits [N, vocab]
    load_weights(HF-named tensors)          -> names loaded, checked against expected_weights()
    shard_sizes(module path)                -> output rows of each part of a packed module
    prepare(device)                         -> buffers computed after materialisation
    rope_table_offset(num_prompt_tokens)    -> rows added to a request's positions to index
                                               its rotary tables (LongRoPE; 0 otherwise)

A loaded name is a parameter name, with `#i` for part i of a packed module and `#e<j>.<i>`
for part i of expert j, so a checkpoint that lacks one shard is caught by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PretrainedConfig

from pinnace.runtime.distributed.pipeline_parallel import Stage
from pinnace.runtime.distributed.tensor_parallel import LazyTensor, ShardSlicer
from pinnace.runtime.layers.packed import PackedMapping, to_our_module
from pinnace.runtime.layers.rotary import RotaryEmbedding

ExpertMapping = Mapping[str, tuple[str, int]]

# <prefix>.experts.<j>.<hf module>.weight -> one expert's tensor of a stacked parameter.
_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<leaf>\w+)\.weight$")


@runtime_checkable
class CausalLM(Protocol):
    """What the engine calls on a model (runner, loader, LoRA)."""

    config: PretrainedConfig
    packed_modules_mapping: ClassVar[PackedMapping]
    lora_target_modules: ClassVar[tuple[str, ...]]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...
    def expected_weights(self) -> set[str]: ...
    def shard_sizes(self, module_path: str) -> tuple[int, ...]: ...
    def tie_weights(self) -> None: ...
    def prepare(self, device: torch.device) -> None: ...
    def rope_table_offset(self, num_prompt_tokens: int) -> int: ...


class CausalLMBase(nn.Module):
    """Weight loading from the declared facts; architectures add their modules and forward.

    A packed module's parent block declares its parts' sizes as `packed_sizes`
    ({"qkv_proj": (q, kv, kv)}), so two packed modules of one name may differ in size
    (Qwen2-MoE's shared expert and its routed experts).
    """

    packed_modules_mapping: ClassVar[PackedMapping] = {}
    expert_params_mapping: ClassVar[ExpertMapping] = {}
    lora_target_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # A tensor-parallel rank's cutter of checkpoint tensors (set by the loader).
        self.tp_slicer: ShardSlicer | None = None
        # A pipeline stage: only its layers' tensors are read (set by the loader).
        self.pp_stage: Stage | None = None

    def shard_sizes(self, module_path: str) -> tuple[int, ...]:
        """Output rows of each part of the packed module at `module_path` (our path)."""
        parent, _, leaf = module_path.rpartition(".")
        block: Any = self.get_submodule(parent)  # declares packed_sizes
        return tuple(block.packed_sizes[leaf])

    def tie_weights(self) -> None:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        """Buffers that do not come from the checkpoint (computed after materialising)."""

    def rope_table_offset(self, num_prompt_tokens: int) -> int:
        """Rows added to a request's positions to index its rotary tables: LongRoPE's
        long-throughout table for a prompt past its switch (layers/rotary.py), else 0.
        The same request always gets the same offset, so its KV blocks are consistent."""
        rotary = getattr(self, "rotary", None)
        if isinstance(rotary, RotaryEmbedding):
            return rotary.table_offset(num_prompt_tokens)
        return 0

    def skips_weight(self, name: str) -> bool:
        """Checkpoint tensors that are accepted and dropped."""
        if "rotary_emb.inv_freq" in name:
            return True
        return name == "lm_head.weight" and self.tie_word_embeddings

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of those loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.skips_weight(name):
                continue
            if self.pp_stage is not None and not self.pp_stage.owns_weight(name):
                continue  # another stage's (a lazy tensor: never read)
            key, dest = self._destination(params, name)
            if self.tp_slicer is not None:
                tensor = self.tp_slicer.take(name, tensor)
                if tensor.shape[0] < dest.shape[0] and self.tp_slicer.is_vocab(name):
                    dest = dest.narrow(0, 0, tensor.shape[0])  # the padded rows stay 0
            elif isinstance(tensor, LazyTensor):
                tensor = tensor.read()
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            with torch.no_grad():
                dest.copy_(tensor)
            loaded.add(key)
        return loaded

    def _destination(self, params: dict[str, nn.Parameter], name: str) -> tuple[str, torch.Tensor]:
        """(loaded key, the view of our parameter the tensor goes into)."""
        expert = _EXPERT.match(name) if self.expert_params_mapping else None
        if expert is not None and expert["leaf"] in self.expert_params_mapping:
            stacked, index = self.expert_params_mapping[expert["leaf"]]
            target, j = f"{expert['prefix']}.{stacked}", int(expert["expert"])
            if target in params and j < params[target].shape[0]:
                start, length = self._rows(target, index)
                return f"{target}#e{j}.{index}", params[target][j].narrow(0, start, length)
        module, _, attr = name.rpartition(".")
        ours, part = to_our_module(self.packed_modules_mapping, module)
        target = f"{ours}.{attr}"
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        if part is None:
            return target, params[target]
        start, length = self._rows(ours, part)
        return f"{target}#{part}", params[target].narrow(0, start, length)

    def _rows(self, module_path: str, part: int) -> tuple[int, int]:
        sizes = self.shard_sizes(module_path)
        return sum(sizes[:part]), sizes[part]

    def expected_weights(self) -> set[str]:
        names: set[str] = set()
        stacked = {s for s, _ in self.expert_params_mapping.values()}
        for name, param in self.named_parameters():
            module, _, attr = name.rpartition(".")
            leaf = module.rpartition(".")[2]
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if leaf == "experts" and attr in stacked:
                parts = len(self.shard_sizes(name))
                experts = range(param.shape[0])
                names.update(f"{name}#e{j}.{p}" for j in experts for p in range(parts))
            elif leaf in self.packed_modules_mapping:
                names.update(f"{name}#{i}" for i in range(len(self.packed_modules_mapping[leaf])))
            else:
                names.add(name)
        return names
