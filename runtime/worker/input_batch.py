"""Persistent step inputs (vLLM v1's InputBatch): preallocated buffers, updated in place.

Every tensor a step feeds the model and the attention backend lives in a buffer allocated
once, so its address never changes (CUDA graphs replay against these addresses) and no
step rebuilds tensors from Python lists:

    per token  [max_num_tokens]    input_ids, positions, slot_mapping
    per step   [max_num_reqs (+1)] query_start_loc, seq_lens, block_table rows, sampling
    per row    [max_num_reqs, ...] block ids and sampling settings of each running request

A request gets a row when it first appears and keeps it until it finishes; a finished
request's row goes back to a free list and the next request to join reuses it (lowest
first). Only what changed is written: a row's new block ids (a sliding window may also
replace released ones), a joining request's sampling settings.

A step's order is the scheduler's; `rows` maps step position -> row:

    step b:        0    1    2          block_table_cpu[rows[b]] -> step_block_table[b]
    rows[b]:       3    0    5          query_start_loc: 0, n0, n0+n1, n0+n1+n2
    tokens:     [ a a | b | c c c ]     positions/slots of request b at qsl[b]:qsl[b+1]

Padding (CUDA graph buckets): a decode step may be padded to `num_padded` requests of one
token each. Padded requests are a dummy token at position 0 whose K/V goes to `pad_slot`
(a slot of a block no request owns) and whose block table is that block; their rows are
never sampled.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention.backend import BatchLayout


@dataclass
class StepInputs:
    """Views into the persistent buffers for one step (first num_tokens / num_reqs rows)."""

    input_ids: torch.Tensor  # [T] int64 (T includes padding)
    positions: torch.Tensor  # [T] int64
    layout: BatchLayout
    sample_idx: list[int]  # token rows that go through the LM head
    num_reqs: int  # real requests (the first num_reqs of the step)
    num_padded_reqs: int  # requests including padding


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_num_tokens: int,
        max_num_blocks_per_req: int,
        block_size: int,
        device: torch.device,
        pad_slot: int = 0,
    ) -> None:
        self.max_num_reqs, self.max_num_tokens = max_num_reqs, max_num_tokens
        self.max_num_blocks_per_req, self.block_size = max_num_blocks_per_req, block_size
        self.device, self.pad_slot = device, pad_slot
        tokens, reqs, blocks, i32 = (
            max_num_tokens,
            max_num_reqs,
            max_num_blocks_per_req,
            torch.int32,
        )
        # Host staging (pinned on CUDA) and their fixed device twins (the same tensor on CPU).
        self.input_ids_cpu, self.input_ids = _pair((tokens,), torch.int64, device)
        self.positions_cpu, self.positions = _pair((tokens,), torch.int64, device)
        self.slot_mapping_cpu, self.slot_mapping = _pair((tokens,), torch.int64, device)
        self.query_start_loc_cpu, self.query_start_loc = _pair((reqs + 1,), i32, device)
        self.seq_lens_cpu, self.seq_lens = _pair((reqs,), i32, device)
        self.step_block_table_cpu, self.step_block_table = _pair((reqs, blocks), i32, device)
        # Per row (persistent across steps): block ids and their count.
        self.block_table_cpu = torch.zeros(reqs, blocks, dtype=i32)
        self._block_ids: list[list[int]] = [[] for _ in range(reqs)]
        self.sampling = SamplingTensors(reqs, device)
        self.req_rows: dict[str, int] = {}
        self._free_rows = list(range(reqs))  # a heap: the lowest free row first
        self._np = {
            name: getattr(self, name).numpy()
            for name in (
                "input_ids_cpu", "positions_cpu", "slot_mapping_cpu", "query_start_loc_cpu",
                "seq_lens_cpu", "step_block_table_cpu", "block_table_cpu",
            )
        }  # fmt: skip

    # -- requests joining and leaving ------------------------------------------------------

    def remove(self, req_ids: Sequence[str] | set[str]) -> None:
        """Free the rows of requests that left (finished, aborted, preempted)."""
        for req_id in req_ids:
            row = self.req_rows.pop(req_id, None)
            if row is not None:
                self._block_ids[row] = []
                heapq.heappush(self._free_rows, row)

    def _row(self, item: ScheduledRequest) -> int:
        row = self.req_rows.get(item.req_id)
        if row is None:
            if not self._free_rows:
                raise RuntimeError(f"more than max_num_reqs={self.max_num_reqs} requests")
            row = heapq.heappop(self._free_rows)
            self.req_rows[item.req_id] = row
            self.sampling.write_row(row, item)
        ids = item.block_ids
        known = self._block_ids[row]
        if len(ids) > self.max_num_blocks_per_req:
            raise ValueError(
                f"request {item.req_id} holds {len(ids)} blocks; the input batch has room for "
                f"{self.max_num_blocks_per_req} (max_model_len / block_size)"
            )
        if len(ids) != len(known) or ids != known:
            # Usually only the tail is new; a released window block changes earlier ids.
            same = len(known) if ids[: len(known)] == known else 0
            self._np["block_table_cpu"][row, same : len(ids)] = ids[same:]
            self._block_ids[row] = list(ids)
        return row

    # -- one step ---------------------------------------------------------------------------

    def prepare(
        self, scheduled: list[ScheduledRequest], num_padded: int | None = None
    ) -> StepInputs:
        """Write the step's inputs into the buffers; `num_padded` pads a decode step to that
        many requests (one token each)."""
        num_reqs = len(scheduled)
        rows = np.fromiter((self._row(s) for s in scheduled), dtype=np.int64, count=num_reqs)
        num_sched = np.fromiter((s.num_scheduled_tokens for s in scheduled), np.int64, num_reqs)
        computed = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64, num_reqs)
        num_tokens = int(num_sched.sum())
        padded_reqs = num_reqs if num_padded is None else num_padded
        if padded_reqs < num_reqs or (padded_reqs > num_reqs and num_tokens != num_reqs):
            raise ValueError("only a decode step (one token per request) may be padded")
        padded_tokens = num_tokens + padded_reqs - num_reqs
        if padded_tokens > self.max_num_tokens or padded_reqs > self.max_num_reqs:
            raise ValueError(
                f"step of {padded_tokens} tokens / {padded_reqs} requests exceeds the input "
                f"batch ({self.max_num_tokens} / {self.max_num_reqs})"
            )
        n = self._np
        qsl = n["query_start_loc_cpu"]
        qsl[0] = 0
        np.cumsum(num_sched, out=qsl[1 : num_reqs + 1])
        # position of token t of request b = computed[b] + t - qsl[b]
        starts = np.repeat(qsl[:num_reqs].astype(np.int64) - computed, num_sched)
        positions = np.arange(num_tokens, dtype=np.int64) - starts
        n["positions_cpu"][:num_tokens] = positions
        n["input_ids_cpu"][:num_tokens] = list(
            itertools.chain.from_iterable(s.token_ids for s in scheduled)
        )
        bs = self.block_size
        block_of = n["block_table_cpu"][np.repeat(rows, num_sched), positions // bs]
        n["slot_mapping_cpu"][:num_tokens] = block_of.astype(np.int64) * bs + positions % bs
        n["seq_lens_cpu"][:num_reqs] = computed + num_sched
        seq_lens = (computed + num_sched).tolist()
        max_blocks = -(-max(seq_lens) // bs) if seq_lens else 1
        n["step_block_table_cpu"][:num_reqs, :max_blocks] = n["block_table_cpu"][rows, :max_blocks]
        if padded_reqs > num_reqs:
            self._write_padding(num_reqs, padded_reqs, num_tokens)
            max_blocks = max(max_blocks, 1)
        self._upload(padded_tokens, padded_reqs, max_blocks)
        sample_idx: list[int] = []
        end = 0
        for s, count in zip(scheduled, num_sched.tolist(), strict=True):
            end += count
            if s.needs_sample:
                # The last known token's row and one per proposed token after it.
                sample_idx.extend(range(end - len(s.spec_token_ids) - 1, end))
        self.sampling.gather(rows, padded_reqs)
        layout = BatchLayout(
            query_lens=num_sched.tolist() + [1] * (padded_reqs - num_reqs),
            num_computed_tokens=computed.tolist() + [0] * (padded_reqs - num_reqs),
            block_tables=[s.block_ids for s in scheduled]
            + [[self.pad_slot // bs]] * (padded_reqs - num_reqs),
            block_size=bs,
            slot_mapping=self.slot_mapping[:padded_tokens],
            device=self.device,
            block_table=self.step_block_table[:padded_reqs],
            block_table_cpu=self.step_block_table_cpu[:padded_reqs],
            query_start_loc=self.query_start_loc[: padded_reqs + 1],
            query_start_loc_cpu=self.query_start_loc_cpu[: padded_reqs + 1],
            seq_lens_tensor=self.seq_lens[:padded_reqs],
            seq_lens_cpu=self.seq_lens_cpu[:padded_reqs],
        )
        return StepInputs(
            self.input_ids[:padded_tokens],
            self.positions[:padded_tokens],
            layout,
            sample_idx,
            num_reqs,
            padded_reqs,
        )

    def _write_padding(self, num_reqs: int, padded_reqs: int, num_tokens: int) -> None:
        n, pad = self._np, padded_reqs - num_reqs
        end = num_tokens + pad
        n["input_ids_cpu"][num_tokens:end] = 0
        n["positions_cpu"][num_tokens:end] = 0
        n["slot_mapping_cpu"][num_tokens:end] = self.pad_slot
        n["query_start_loc_cpu"][num_reqs + 1 : padded_reqs + 1] = np.arange(
            num_tokens + 1, end + 1
        )
        n["seq_lens_cpu"][num_reqs:padded_reqs] = 1
        n["step_block_table_cpu"][num_reqs:padded_reqs, 0] = self.pad_slot // self.block_size

    def _upload(self, num_tokens: int, num_reqs: int, max_blocks: int) -> None:
        """Host staging -> the fixed device buffers (asynchronous from pinned memory)."""
        if self.device.type == "cpu":
            return  # the staging buffers are the device buffers
        for name in ("input_ids", "positions", "slot_mapping"):
            getattr(self, name)[:num_tokens].copy_(
                getattr(self, name + "_cpu")[:num_tokens], non_blocking=True
            )
        self.query_start_loc[: num_reqs + 1].copy_(
            self.query_start_loc_cpu[: num_reqs + 1], non_blocking=True
        )
        self.seq_lens[:num_reqs].copy_(self.seq_lens_cpu[:num_reqs], non_blocking=True)
        self.step_block_table[:num_reqs, :max_blocks].copy_(
            self.step_block_table_cpu[:num_reqs, :max_blocks], non_blocking=True
        )


def _pair(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(host staging, device buffer): pinned + device on CUDA, one tensor twice on CPU."""
    if device.type == "cpu":
        host = torch.zeros(shape, dtype=dtype)
        return host, host
    return torch.zeros(shape, dtype=dtype, pin_memory=True), torch.zeros(
        shape, dtype=dtype, device=device
    )


class SamplingTensors:
    """Per-row sampling settings, written when a request joins, gathered per step into
    fixed [max_num_reqs] buffers in step order (the first num_reqs entries are the step's;
    padded entries hold the neutral settings)."""

    NEUTRAL: ClassVar[dict[str, float]] = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
    }

    def __init__(self, max_num_reqs: int, device: torch.device) -> None:
        f32, i32 = torch.float32, torch.int32
        dtypes = {"temperature": f32, "top_p": f32, "top_k": i32, "min_p": f32}
        self.rows_cpu = {
            name: torch.full((max_num_reqs,), self.NEUTRAL[name], dtype=dt)
            for name, dt in dtypes.items()
        }
        self._staging: dict[str, torch.Tensor] = {}
        self.step: dict[str, torch.Tensor] = {}
        for name, dt in dtypes.items():
            self._staging[name], self.step[name] = _pair((max_num_reqs,), dt, device)

    def write_row(self, row: int, item: ScheduledRequest) -> None:
        p = item.sampling_params
        self.rows_cpu["temperature"][row] = 1.0 if p.is_greedy else p.temperature
        self.rows_cpu["top_p"][row] = p.top_p
        self.rows_cpu["top_k"][row] = p.top_k
        self.rows_cpu["min_p"][row] = p.min_p

    def gather(self, rows: np.ndarray, num_padded: int) -> None:
        index, num_reqs = torch.from_numpy(rows), len(rows)
        for name, per_row in self.rows_cpu.items():
            staging = self._staging[name]
            torch.index_select(per_row, 0, index, out=staging[:num_reqs])
            staging[num_reqs:num_padded] = self.NEUTRAL[name]
            if self.step[name] is not staging:
                self.step[name][:num_padded].copy_(staging[:num_padded], non_blocking=True)
