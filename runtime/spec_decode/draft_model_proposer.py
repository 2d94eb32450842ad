"""Draft-model proposals: a smaller model with the target's vocabulary proposes k tokens
greedily; the target verifies them in its next step (rejection_sampler.py).

The draft keeps its own paged KV cache, one tensor per draft layer, addressed by the SAME
block ids and slots as the target's. So the scheduler's one KV cache manager allocates,
frees, prefix-caches, preempts and rolls back both caches together, and the engine's KV
budget pays for both (engine/setup.py). Per step:

    prefill  the draft runs on exactly the target's rows (same tokens, positions, slots,
             prompt chunks, proposals): its KV then covers every token the target's does,
             accepted proposals included, and a rolled-back slot is overwritten later in
             both caches alike
    decode   per request that sampled, k one-token forwards from its last new token:

                 position:   p          p+1        ...  p+k-1
                 input:      f          e_1             e_{k-1}      (f: the step's last
                 argmax:     e_1        e_2             e_k           sampled token)

             These write draft KV at p .. p+k-1, past the request's computed tokens; the
             scheduler reserves k lookahead slots for them (Scheduler.num_lookahead_tokens).
             The next step's prefill writes the same positions again with the tokens it
             verifies, so nothing there outlives a step.

A greedy draft is a one-hot proposal distribution: verification is exact for greedy
requests and keeps the target's distribution for sampled ones.
"""

from __future__ import annotations

import torch
from torch import nn

from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention.backend import AttentionBackend, BatchLayout
from pinnace.runtime.layers.forward_context import ForwardContext, forward_context


class DraftModelProposer:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        num_speculative_tokens: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches  # per draft layer, same slots as the target's
        self.backend = backend  # the draft's own (its KV head count may differ)
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: BatchLayout,
        num_prompt_tokens: list[int],
    ) -> None:
        """Run the draft on the target's step rows ([T] ids and positions): KV only."""
        self._forward(input_ids, positions, layout, num_prompt_tokens)

    @torch.inference_mode()
    def propose(self, items: list[ScheduledRequest], sampled: list[list[int]]) -> list[list[int]]:
        """Per item, up to k greedy draft tokens after its step's last sampled token."""
        bs = self.block_size
        starts = [_last_position(item, new) for item, new in zip(items, sampled, strict=True)]
        # A proposal must stay inside the context and the blocks reserved for it.
        limits = [
            min(self.k, self.max_model_len - 1 - p, len(item.block_ids) * bs - p)
            for item, p in zip(items, starts, strict=True)
        ]
        proposals: list[list[int]] = [[] for _ in items]
        tokens = [new[-1] for new in sampled]
        dev = self.kv_caches[0].device
        for j in range(self.k):
            active = [i for i, n in enumerate(limits) if n > j]
            if not active:
                break
            pos = [starts[i] + j for i in active]
            tables = [items[i].block_ids for i in active]
            slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)]
            layout = BatchLayout(
                query_lens=[1] * len(active),
                num_computed_tokens=pos,
                block_tables=tables,
                block_size=bs,
                slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                device=dev,
            )
            hidden = self._forward(
                torch.tensor([tokens[i] for i in active], dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev),
                layout,
                [len(items[i].prompt_token_ids) for i in active],
            )
            logits = self.model.compute_logits(hidden)  # type: ignore[operator]  # [B, V]
            for i, token in zip(active, logits.argmax(dim=-1).tolist(), strict=True):
                proposals[i].append(token)
                tokens[i] = token
        return proposals

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: BatchLayout,
        num_prompt_tokens: list[int],
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the draft; its K/V into the draft cache."""
        offsets = [self.model.rope_table_offset(n) for n in num_prompt_tokens]  # type: ignore[operator]
        rope = None
        if any(offsets):
            rows = [o for o, n in zip(offsets, layout.query_lens, strict=True) for _ in range(n)]
            rope = torch.tensor(rows, dtype=torch.long, device=input_ids.device)
        metadata = self.backend.build_metadata(layout)
        ctx = ForwardContext(self.backend, metadata, self.kv_caches, rope)
        with forward_context(ctx):
            hidden: torch.Tensor = self.model(input_ids, positions)
        return hidden


def _last_position(item: ScheduledRequest, new: list[int]) -> int:
    """Position of the step's last sampled token: the known tokens end before the
    proposals, then come the accepted proposals and the token sampled after them."""
    num_known_end = item.num_computed_tokens + item.num_scheduled_tokens - len(item.spec_token_ids)
    return num_known_end + len(new) - 1
