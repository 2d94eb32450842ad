"""Pipeline parallelism (vLLM's shape): each stage owns a contiguous range of decoder layers.

    stage 0            stage 1  ...          stage pp-1
    embed_tokens       (received hidden)     (received hidden)
    layers[0:a]   -->  layers[a:b]  -->  ... layers[c:L]
                                             norm, lm_head -> logits --> driver (rank 0)

A stage's model is the architecture built whole on the meta device, then pruned: the
layers and modules it does not own become `PPMissingLayer`s (no parameters, never
materialised), so parameter names, Attention layer indices and KV cache indices stay the
global ones. Only the owned modules' checkpoint tensors are read (`Stage.owns_weight`).
With tied embeddings the last stage keeps `embed_tokens` too: its LM head is that weight.

Between stages only the hidden states travel ([T, hidden] in the model dtype; our decoder
layers add their residual in place, so there is no separate residual stream). The step
is not split into microbatches: the stages run one after another, so PP here trades
speed for memory (a model too large for one device), not for throughput.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pinnace.runtime.distributed.parallel_state import ParallelGroup

# vLLM's override of the split, e.g. "13,12,12,13" for 50 layers on 4 stages.
PARTITION_ENV = "PINNACE_PP_LAYER_PARTITION"


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of stage `pp_rank`'s layers: an even split whose remainder goes to the
    stages before the last (the first and last also hold embedding and LM head), as
    vLLM's get_pp_indices does."""
    partition = os.environ.get(PARTITION_ENV)
    if partition:
        sizes = [int(n) for n in partition.split(",")]
        if len(sizes) != pp_size or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(
                f"{PARTITION_ENV}={partition!r} must list {pp_size} positive layer counts "
                f"summing to the model's {num_layers} layers."
            )
    else:
        sizes = [num_layers // pp_size] * pp_size
        for i in range(2, num_layers % pp_size + 2):
            sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


class PPMissingLayer(nn.Module):
    """A module another stage owns: no parameters; calling it is a bug."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("this module belongs to another pipeline stage")


@dataclass(frozen=True)
class Stage:
    """This rank's pipeline stage and the layers it owns."""

    pp_rank: int
    pp_size: int
    start: int
    end: int
    tied: bool = False  # tied embeddings: the last stage keeps embed_tokens for its head

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def keeps_embedding(self) -> bool:
        return self.is_first or (self.is_last and self.tied)

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def owns_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` (HF naming) belongs to this stage."""
        if ".layers." in name:
            index = name.partition(".layers.")[2].partition(".")[0]
            if index.isdigit():
                return self.start <= int(index) < self.end
        if name.endswith("embed_tokens.weight"):
            return self.keeps_embedding
        if name.startswith("lm_head.") or name.startswith("model.norm."):
            return self.is_last
        return True


def stage_of(config: object, pp_rank: int, pp_size: int) -> Stage:
    layers = int(config.num_hidden_layers)  # type: ignore[attr-defined]
    start, end = get_pp_indices(layers, pp_rank, pp_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return Stage(pp_rank, pp_size, start, end, tied)


def prune_to_stage(model: nn.Module, stage: Stage) -> None:
    """Replace what `stage` does not own with PPMissingLayer (call on the meta model,
    before materialising: pruned modules never get memory)."""
    body: nn.Module = model.model  # type: ignore[assignment]
    layers: nn.ModuleList = body.layers  # type: ignore[assignment]
    for i in range(len(layers)):
        if i not in stage.layers:
            layers[i] = PPMissingLayer()
    if not stage.keeps_embedding:
        body.embed_tokens = PPMissingLayer()
    if not stage.is_last:
        body.norm = PPMissingLayer()
        model.lm_head = PPMissingLayer()
    body.stage = stage  # type: ignore[assignment]


class StageLink:
    """One stage's traffic in a step (every rank of the stage runs the same):

        not first:  recv the previous stage's hidden [T, hidden] (from the same tp rank)
        not last:   send the hidden to the next stage
        last:       its tensor rank 0 (the output rank) sends the sample rows' logits
                    [N, vocab] float32, and prompt logprobs when asked, to the driver

    T and N are known on every rank from the step's broadcast SchedulerOutput, so no shape
    travels. The driver (rank 0, stage 0) samples, as without pipeline stages."""

    def __init__(
        self,
        group: ParallelGroup,
        hidden_size: int,
        vocab_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.group, self.hidden_size, self.vocab_size = group, hidden_size, vocab_size
        self.dtype, self.device = dtype, device

    @property
    def is_first(self) -> bool:
        return self.group.is_first_stage

    @property
    def is_last(self) -> bool:
        return self.group.is_last_stage

    def recv_hidden(self, num_tokens: int) -> torch.Tensor:
        src = self.group.rank - self.group.tp_size
        return self.group.recv((num_tokens, self.hidden_size), self.dtype, self.device, src)

    def send_hidden(self, hidden: torch.Tensor) -> None:
        self.group.send(hidden, self.group.rank + self.group.tp_size)

    def send_output(self, logits: torch.Tensor | None, prompt_logprobs: object) -> None:
        """From the last stage: what the driver needs to sample (None: nothing to send)."""
        if self.group.rank != self.group.output_rank:
            return
        if logits is not None:
            self.group.send(logits, 0)
        if prompt_logprobs is not None:
            self.group.send_object(prompt_logprobs, 0)

    def recv_output(
        self, num_rows: int, wants_prompt_logprobs: bool
    ) -> tuple[torch.Tensor | None, Any]:
        """On the driver: (logits [num_rows, vocab] or None, prompt logprobs or None)."""
        src = self.group.output_rank
        logits = None
        if num_rows:
            logits = self.group.recv((num_rows, self.vocab_size), torch.float32, self.device, src)
        prompt = self.group.recv_object(src) if wants_prompt_logprobs else None
        return logits, prompt
