"""Executes a SchedulerOutput: fills the step inputs, runs the model, samples.

    execute(SchedulerOutput) -> ModelRunnerOutput

Token rows of all scheduled requests are concatenated ([T] ids/positions/slots, in the
persistent buffers of input_batch.py); only
the last row of each request that needs a sample goes through the LM head (the last k + 1
with k proposed tokens to verify), plus the prompt rows of requests asking prompt
logprobs. With a proposer, each request that sampled gets proposals for the next step.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pinnace.runtime.core.outputs import (
    Logprob,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from pinnace.runtime.distributed.pipeline_parallel import StageLink
from pinnace.runtime.layers.attention.backend import AttentionBackend, BatchLayout
from pinnace.runtime.layers.forward_context import ForwardContext, forward_context
from pinnace.runtime.lora.context import lora_batch_context
from pinnace.runtime.lora.manager import LoRAManager
from pinnace.runtime.spec_decode.draft_model_proposer import DraftModelProposer
from pinnace.runtime.spec_decode.proposer import Proposer
from pinnace.runtime.worker.cuda_graphs import CUDAGraphRunner
from pinnace.runtime.worker.embed_batches import Piece, plan_embed_forwards, scratch_blocks
from pinnace.runtime.worker.input_batch import InputBatch
from pinnace.runtime.worker.kv_cache import allocate_kv_caches
from pinnace.runtime.worker.pooler import PoolingConfig, pool
from pinnace.runtime.worker.sampler import Sampler, SamplingRow, prompt_logprobs

# Prompt rows sent through the LM head at once for prompt logprobs ([rows, V] float32).
_PROMPT_ROWS_PER_SLICE = 256


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
        max_num_batched_tokens: int = 2048,
        input_batch: InputBatch | None = None,
    ) -> None:
        self.model = model
        self.max_num_batched_tokens = max_num_batched_tokens  # per forward, embed's too
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.lora: LoRAManager | None = None  # set by the engine when LoRA is enabled
        self.proposer: Proposer | None = None  # set by the engine for speculative decoding
        self.max_spec_batch_size: int | None = None  # more requests sampling: no proposals
        # Only the driver (rank 0) samples; the other ranks run the forward and the LM head
        # (whose gather is a collective) and stop there. Under pipeline parallelism the
        # last stage sends the driver its logits (StageLink).
        self.is_driver = True
        self.cuda_graphs: CUDAGraphRunner | None = None  # set by the engine on CUDA
        # A pipeline stage's sends and receives (set by the engine when pp > 1).
        self.pipeline: StageLink | None = None
        # Persistent step inputs; None: one for 256 requests of up to 8k tokens.
        self.input_batch = input_batch or InputBatch(
            256, max_num_batched_tokens + 256, 8192 // block_size + 1, block_size, device
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.sampler.drop(sched.finished_req_ids)
        gone = sched.finished_req_ids | sched.preempted_req_ids
        self.input_batch.remove(gone)
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.begin_step(sched.scheduled, gone)
        if sched.is_empty:
            return ModelRunnerOutput()
        lora_batch = None
        if self.lora is not None:
            # Requests reordered so each adapter's rows are one slice of the batch.
            scheduled, lora_batch = self.lora.prepare(sched.scheduled)
            sched = dataclasses.replace(sched, scheduled=scheduled)
        query_lens = [s.num_scheduled_tokens for s in sched.scheduled]
        num_prompt_tokens = [len(s.prompt_token_ids) for s in sched.scheduled]
        rope = self._rope_offsets(num_prompt_tokens, query_lens)
        bucket = None
        if self.cuda_graphs is not None:
            eager_only = lora_batch is not None or rope is not None
            bucket = self.cuda_graphs.bucket_for(query_lens, eager_only)
        step = self.input_batch.prepare(sched.scheduled, num_padded=bucket)
        sample_idx = step.sample_idx
        if self.cuda_graphs is not None and bucket is not None:
            hidden = self.cuda_graphs.run(step, bucket)  # [bucket, hidden]; padded rows unread
        else:
            metadata = self.backend.build_metadata(step.layout)
            ctx = ForwardContext(self.backend, metadata, self.kv_caches, rope)
            inputs = [step.input_ids, step.positions]
            if self.pipeline is not None and not self.pipeline.is_first:
                inputs.append(self.pipeline.recv_hidden(step.input_ids.shape[0]))
            with forward_context(ctx), lora_batch_context(lora_batch):
                hidden = self.model(*inputs)  # [T, hidden]
        out = ModelRunnerOutput()
        if self.pipeline is not None:
            logits = self._pipeline_outputs(sched, hidden, sample_idx, out)
        else:
            self._prompt_logprobs(sched, hidden, out)
            logits = self._logits(hidden, sample_idx)
        if logits is None:
            if self.is_driver:
                self._propose(sched, [], [], out)  # a draft's KV follows prompt chunks
            return out
        if not self.is_driver:
            return out
        items = [s for s in sched.scheduled if s.needs_sample]
        rows = [
            SamplingRow(
                s.req_id,
                s.sampling_params,
                s.num_output_tokens,
                s.prompt_token_ids,
                s.output_token_ids,
                s.spec_token_ids,
            )
            for s in items
        ]
        tokens, logprobs = self.sampler(logits, rows)
        for item, new, lp in zip(items, tokens, logprobs, strict=True):
            out.sampled_token_ids[item.req_id] = new
            if lp is not None:
                out.logprobs[item.req_id] = lp
        self._propose(sched, items, tokens, out)
        return out

    def _logits(self, hidden: torch.Tensor, sample_idx: list[int]) -> torch.Tensor | None:
        """[N, vocab] float32 logits of the sample rows (None: no row samples)."""
        if not sample_idx:
            return None
        rows_idx = torch.tensor(sample_idx, device=self.device)
        return self.model.compute_logits(hidden[rows_idx])  # type: ignore[operator]

    def _pipeline_outputs(
        self,
        sched: SchedulerOutput,
        hidden: torch.Tensor,
        sample_idx: list[int],
        out: ModelRunnerOutput,
    ) -> torch.Tensor | None:
        """A pipeline stage's end of the step: earlier stages pass their hidden on, the
        last computes logits (and prompt logprobs) and sends them to the driver, which
        returns them to sample; None on every other rank."""
        assert self.pipeline is not None
        wants_prompt = any(s.num_prompt_logprobs is not None for s in sched.scheduled)
        if not self.pipeline.is_last:
            self.pipeline.send_hidden(hidden)
            if not self.is_driver:
                return None
            logits, prompt = self.pipeline.recv_output(len(sample_idx), wants_prompt)
            if prompt is not None:
                out.prompt_logprobs = prompt
            return logits
        self._prompt_logprobs(sched, hidden, out)
        logits = self._logits(hidden, sample_idx)
        self.pipeline.send_output(logits, out.prompt_logprobs if wants_prompt else None)
        return None

    def _propose(
        self,
        sched: SchedulerOutput,
        items: list[ScheduledRequest],
        tokens: list[list[int]],
        out: ModelRunnerOutput,
    ) -> None:
        """Next-step proposals for the requests that sampled. Constrained requests get
        none: their grammar mask would have to follow each proposal. Above
        max_spec_batch_size requests sampling, none at all: a draft model does not even
        run (it catches up when the batch shrinks, draft_model_proposer.py)."""
        if self.proposer is None:
            return
        if self.max_spec_batch_size is not None and len(items) > self.max_spec_batch_size:
            return
        picked = [i for i, s in enumerate(items) if s.sampling_params.structured_outputs is None]
        if isinstance(self.proposer, DraftModelProposer):
            # Prompt chunks only while the whole batch is small: in a big one (say 32
            # prompts prefilled in chunks) they would likely never be proposed for; a
            # request catches its prompt up when it first proposes.
            small = self.max_spec_batch_size is None or (
                len(sched.scheduled) <= self.max_spec_batch_size
            )
            chunks = [
                s
                for s in sched.scheduled
                if small and not s.needs_sample and s.sampling_params.structured_outputs is None
            ]
            if not picked and not chunks:
                return
            proposals = self.proposer.propose(
                [items[i] for i in picked], [tokens[i] for i in picked], chunks
            )
        elif not picked:
            return
        else:
            proposals = self.proposer.propose(
                [items[i] for i in picked], [tokens[i] for i in picked]
            )
        for i, spec in zip(picked, proposals, strict=True):
            if spec:
                out.spec_token_ids[items[i].req_id] = spec

    def _prompt_logprobs(
        self, sched: SchedulerOutput, hidden: torch.Tensor, out: ModelRunnerOutput
    ) -> None:
        """Logprobs of the prompt tokens this step's chunks predict, per asking request.

        A chunk covers positions start .. start + n - 1; the row at position p scores
        prompt token p + 1, so rows up to the prompt's second-to-last position count (the
        last prompt row predicts the first output token and is sampled as usual).
        """
        rows: list[int] = []
        spans: list[tuple[str, int, int]] = []  # req_id, first row in `rows`, row count
        targets: list[int] = []
        num_top: list[int] = []
        base = 0
        for item in sched.scheduled:
            k = item.num_prompt_logprobs
            if k is not None:
                start = item.num_computed_tokens
                end = min(start + item.num_scheduled_tokens, len(item.prompt_token_ids) - 1)
                if end > start:
                    spans.append((item.req_id, len(rows), end - start))
                    rows.extend(range(base, base + end - start))
                    targets.extend(item.prompt_token_ids[start + 1 : end + 1])
                    num_top.extend([k] * (end - start))
            base += item.num_scheduled_tokens
        if not rows:
            return
        # In slices: a 2k-token chunk's logits over a 49k vocabulary would be 400 MB at once.
        entries: list[dict[int, Logprob]] = []
        for lo in range(0, len(rows), _PROMPT_ROWS_PER_SLICE):
            hi = lo + _PROMPT_ROWS_PER_SLICE
            idx = torch.tensor(rows[lo:hi], device=self.device)
            logits = self.model.compute_logits(hidden[idx])  # type: ignore[operator]
            entries += prompt_logprobs(logits, targets[lo:hi], num_top[lo:hi])
        for req_id, first, count in spans:
            out.prompt_logprobs[req_id] = entries[first : first + count]

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], pooling: PoolingConfig) -> torch.Tensor:
        """Pooled final hidden states [B, H] (float32) of whole prompts.

        Runs outside the scheduler, in forwards of at most max_num_batched_tokens tokens
        (embed_batches.py) whose K/V go to one scratch cache of their own (never the
        engine's blocks) sized to that budget, or to the longest prompt if it is longer.
        """
        bs = self.block_size
        lens = [len(p) for p in prompts]
        forwards = plan_embed_forwards(lens, self.max_num_batched_tokens, bs)
        num_blocks, kv_dtype = scratch_blocks(forwards, bs), self.kv_caches[0].dtype
        config = self.model.config
        scratch = allocate_kv_caches(config, num_blocks, bs, kv_dtype, self.device, self.backend)  # type: ignore[arg-type]
        pooled: list[torch.Tensor] = []
        partial: list[torch.Tensor] = []  # rows of a long prompt run in pieces
        for pieces in forwards:
            hidden = self._embed_forward(prompts, pieces, scratch)  # [T, hidden]
            rows = 0
            for piece in pieces:
                count = piece.end - piece.start
                partial.append(hidden[rows : rows + count])
                rows += count
                if piece.end == lens[piece.index]:
                    whole = torch.cat(partial) if len(partial) > 1 else partial[0]
                    pooled.append(pool(whole, [lens[piece.index]], pooling))
                    partial = []
        return torch.cat(pooled)

    def _embed_forward(
        self, prompts: list[list[int]], pieces: list[Piece], scratch: list[torch.Tensor]
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of one forward's pieces; K/V into `scratch`.
        A piece's token p (of its prompt) is at slot first_block * block_size + p."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        for piece in pieces:
            ids.extend(prompts[piece.index][piece.start : piece.end])
            positions.extend(range(piece.start, piece.end))
            first = piece.first_block
            slots.extend(range(first * bs + piece.start, first * bs + piece.end))
            tables.append(list(range(first, first + -(-piece.end // bs))))
        layout = BatchLayout(
            query_lens=[p.end - p.start for p in pieces],
            num_computed_tokens=[p.start for p in pieces],
            block_tables=tables,
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            device=self.device,
        )
        rope = self._rope_offsets([len(prompts[p.index]) for p in pieces], layout.query_lens)
        ctx = ForwardContext(self.backend, self.backend.build_metadata(layout), scratch, rope)
        input_ids = torch.tensor(ids, device=self.device)
        rows = torch.tensor(positions, device=self.device)
        with forward_context(ctx):
            hidden: torch.Tensor = self.model(input_ids, rows)
        return hidden

    def _rope_offsets(
        self, num_prompt_tokens: list[int], query_lens: list[int]
    ) -> torch.Tensor | None:
        """[T] rotary table offsets of the step's rows (the model's, per request: LongRoPE
        rotates a request with a long prompt by its long table); None when all are 0."""
        offsets = [self.model.rope_table_offset(n) for n in num_prompt_tokens]  # type: ignore[operator]
        if not any(offsets):
            return None
        rows = [o for o, n in zip(offsets, query_lens, strict=True) for _ in range(n)]
        return torch.tensor(rows, dtype=torch.long, device=self.device)
