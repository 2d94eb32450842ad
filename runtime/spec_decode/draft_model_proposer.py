"""Draft-model proposals: a smaller model with the target's vocabulary proposes k tokens
greedily; the target verifies them in its next step (rejection_sampler.py).

The draft keeps its own paged KV cache, one tensor per draft layer, addressed by the SAME
block ids and slots as the target's. So the scheduler's one KV cache manager allocates,
frees, prefix-caches, preempts and rolls back both caches together, and the engine's KV
budget pays for both (engine/setup.py).

The draft runs only in steps that propose (at most `disable_by_batch_size` requests
sampling; above it a batch is compute-bound and the draft would only cost). Each request
keeps its own draft-computed count, apart from the target's num_computed_tokens:
positions [0, computed) of its tokens have draft KV. When a step proposes, the draft runs
ONE forward over, per request, the positions it lacks up to the step's last sampled token
f at position p (a catch-up after steps without the draft, a prompt chunk, the accepted
tokens), with LM-head logits at row p only, then k - 1 one-token forwards:

    forward     rows:       computed .. p-1   p          (catch-up / accepted, then f)
    decode      position:   p+1        ...  p+k-1
                input:      e_1             e_{k-1}
                argmax:     e_2             e_k          (e_1: the argmax at row p)

The decode forwards write draft KV at p+1 .. p+k-1 with the proposals (the scheduler
reserves k lookahead slots for them, Scheduler.num_lookahead_tokens). The request keeps
those tokens as its `tail`: next time, the accepted ones are already computed and only
positions from the first rejected one on run again (their slots are overwritten then).

Prefix caching: a cache hit shares blocks whose draft KV may never have been written (the
draft was skipped when the target wrote them). `valid_blocks[b]` says block b's draft KV
matches its tokens: set once a request's draft-computed count passes the block's end,
cleared whenever the target writes into the block (a reused block's old flag never
survives its new content). A new request (or one resumed after preemption) starts with
computed = its leading run of valid hit blocks and catches up the rest. Catch-up rows per
step are capped at `max_catch_up_tokens`; a request whose catch-up does not fit goes on
next step, without proposals this one.

Sliding window: the KV manager releases a request's blocks outside the window of its
target-computed count, so a catch-up longer than the window starts at the first kept
block and attends from there on (each draft forward's tables begin at that block): its
first window of rows sees fewer keys than the target's did, never a released block's
(whose id is a placeholder, or by now another request's).

A greedy draft is a one-hot proposal distribution: verification is exact for greedy
requests and keeps the target's distribution for sampled ones. A wrong draft KV costs
acceptance, never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention.backend import AttentionBackend, BatchLayout
from pinnace.runtime.layers.forward_context import ForwardContext, forward_context


@dataclass
class _DraftState:
    computed: int  # positions [0, computed) of the request's tokens hold draft KV
    marked: int  # its first `marked` blocks are flagged in valid_blocks
    tail: list[int] = field(default_factory=list)  # proposals with KV at computed, ...


@dataclass
class _Piece:
    """One request's rows in the draft's forward: positions [start, end)."""

    item: ScheduledRequest
    new: list[int]  # this step's sampled tokens (empty for a prompt chunk)
    start: int
    end: int
    num_proposals: int  # 0: KV only, no logits


@dataclass
class DraftCounters:
    """What the draft computed (tests and profiling read these)."""

    num_forward_tokens: int = 0  # rows of the first forward of each proposing step
    num_catch_up_tokens: int = 0  # of those, rows below the target's step start
    num_decode_tokens: int = 0  # rows of the one-token forwards


class DraftModelProposer:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        num_speculative_tokens: int,
        max_model_len: int,
        num_blocks: int,  # the KV manager's (block ids index the flags)
        max_catch_up_tokens: int = 2048,
        sliding_window: int | None = None,  # blocks outside it are released (see setup.py)
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches  # per draft layer, same slots as the target's
        self.backend = backend  # the draft's own (its KV head count may differ)
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_catch_up_tokens = max_catch_up_tokens
        self.sliding_window = sliding_window
        self.valid_blocks = bytearray(num_blocks)  # 1: the block's draft KV matches its tokens
        self.counters = DraftCounters()
        self._states: dict[str, _DraftState] = {}

    def draft_computed(self, req_id: str) -> int | None:
        return None if (s := self._states.get(req_id)) is None else s.computed

    def begin_step(self, scheduled: list[ScheduledRequest], gone: set[str]) -> None:
        """Every step, before the target writes KV (the draft may not run in it): forget
        requests that left, clear the flags of the blocks the target writes, and start
        new requests at their leading run of hit blocks with valid draft KV. Clearing
        comes first: a request admitted in this step may hit blocks written in it."""
        for req_id in gone:
            self._states.pop(req_id, None)
        bs, valid = self.block_size, self.valid_blocks
        for item in scheduled:
            first = item.num_computed_tokens // bs
            last = (item.num_computed_tokens + item.num_scheduled_tokens - 1) // bs
            for i in range(first, last + 1):
                valid[item.block_ids[i]] = 0
            state = self._states.get(item.req_id)
            if state is not None:
                state.marked = min(state.marked, first)
        for item in scheduled:
            if item.req_id not in self._states:
                hits = item.num_computed_tokens // bs  # a hit is whole blocks
                n = 0
                while n < hits and valid[item.block_ids[n]]:
                    n += 1
                self._states[item.req_id] = _DraftState(computed=n * bs, marked=n)

    @torch.inference_mode()
    def propose(
        self,
        items: list[ScheduledRequest],
        sampled: list[list[int]],
        chunks: list[ScheduledRequest] | None = None,
    ) -> list[list[int]]:
        """Per item, up to k greedy draft tokens after its step's last sampled token.
        `chunks`: requests in the middle of their prompt, whose draft KV follows along."""
        budget = self.max_catch_up_tokens
        pieces: list[_Piece] = []
        for item, new in zip(items, sampled, strict=True):
            p = _last_position(item, new)
            piece, budget = self._piece(item, new, p + 1, self._num_proposals(item, p), budget)
            pieces.append(piece)
        for item in chunks or []:
            end = item.num_computed_tokens + item.num_scheduled_tokens
            piece, budget = self._piece(item, [], end, 0, budget)
            if piece.end > piece.start:
                pieces.append(piece)
        proposals: list[list[int]] = [[] for _ in items]
        rows = [piece for piece in pieces if piece.end > piece.start]
        if not rows:
            return proposals
        hidden = self._run(rows)
        # Row p of each proposing request: its first proposal.
        ends, last = [], -1
        for piece in rows:
            last += piece.end - piece.start
            if piece.num_proposals:
                ends.append(last)
        active = [i for i, piece in enumerate(pieces) if piece.num_proposals]
        for piece in rows:
            self._advance(piece)
        if not active:
            return proposals
        idx = torch.tensor(ends, dtype=torch.long, device=hidden.device)
        logits = self.model.compute_logits(hidden[idx])  # type: ignore[operator]  # [B, V]
        tokens = logits.argmax(dim=-1).tolist()
        for i, token in zip(active, tokens, strict=True):
            proposals[i].append(token)
        for j in range(1, self.k):
            active = [i for i in active if pieces[i].num_proposals > j]
            if not active:
                break
            # e_j at position p + j (p = end - 1): its KV, and e_{j+1}.
            decode = [
                _Piece(pieces[i].item, [], pieces[i].end + j - 1, pieces[i].end + j, 1)
                for i in active
            ]
            inputs = [proposals[i][-1] for i in active]
            hidden = self._run(decode, inputs)
            logits = self.model.compute_logits(hidden)  # type: ignore[operator]
            for i, token in zip(active, logits.argmax(dim=-1).tolist(), strict=True):
                proposals[i].append(token)
        for i, piece in enumerate(pieces[: len(items)]):
            # Draft KV at p + 1 .. p + n - 1 holds e_1 .. e_{n-1}.
            self._states[piece.item.req_id].tail = proposals[i][: piece.num_proposals - 1]
        return proposals

    def _num_proposals(self, item: ScheduledRequest, p: int) -> int:
        """Proposals e_1 .. e_n write draft KV at p .. p + n - 1: inside the context and
        the blocks reserved for the request."""
        room = len(item.block_ids) * self.block_size - p
        return max(0, min(self.k, self.max_model_len - 1 - p, room))

    def _piece(
        self, item: ScheduledRequest, new: list[int], end: int, num_proposals: int, budget: int
    ) -> tuple[_Piece, int]:
        """The rows [start, end) the request still lacks (the draft-computed count first
        moved over the accepted part of its tail), cut to the catch-up budget: rows below
        the target's step start are catch-up. A cut request proposes nothing this step."""
        state = self._states[item.req_id]
        tail, state.tail = state.tail, []
        for token in tail:
            if state.computed >= end - 1 or _token_at(item, new, state.computed) != token:
                break
            state.computed += 1
        start = min(state.computed, end - 1) if num_proposals else state.computed
        kept = self._first_kept_position(item)
        if start < kept:
            # Outside the window its blocks are released: the draft starts at the first
            # kept block, and its attention reaches no further back (_run), so the rows of
            # its first window see fewer keys than the target's did (acceptance may dip,
            # outputs do not change).
            start = kept
            state.marked = max(state.marked, kept // self.block_size)
        catch_up = max(0, min(item.num_computed_tokens, end) - start)
        if catch_up > budget:
            return _Piece(item, new, start, start + budget, 0), 0
        return _Piece(item, new, start, end, num_proposals), budget - catch_up

    def _first_kept_position(self, item: ScheduledRequest) -> int:
        """First position of the first block the KV manager kept (kv_cache_manager.py
        releases the blocks no query from num_computed_tokens on can see)."""
        if self.sliding_window is None:
            return 0
        first_needed = max(0, item.num_computed_tokens - self.sliding_window + 1)
        return first_needed // self.block_size * self.block_size

    def _advance(self, piece: _Piece) -> None:
        """After the forward: the request's draft KV covers [0, end); flag the blocks it
        now fully covers."""
        state = self._states[piece.item.req_id]
        counters = self.counters
        counters.num_forward_tokens += piece.end - piece.start
        counters.num_catch_up_tokens += max(
            0, min(piece.item.num_computed_tokens, piece.end) - piece.start
        )
        state.computed = max(state.computed, piece.end)
        full = state.computed // self.block_size
        for i in range(state.marked, full):
            self.valid_blocks[piece.item.block_ids[i]] = 1
        state.marked = max(state.marked, full)

    def _run(self, pieces: list[_Piece], inputs: list[int] | None = None) -> torch.Tensor:
        """The draft's forward over the pieces' rows (tokens: the request's own, or one
        `inputs` token per piece); final hidden states [T, hidden], K/V into the cache."""
        bs, dev = self.block_size, self.kv_caches[0].device
        ids: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        for n, piece in enumerate(pieces):
            if inputs is None:
                ids.extend(_tokens(piece.item, piece.new, piece.start, piece.end))
            else:
                ids.append(inputs[n])
            table = piece.item.block_ids
            for pos in range(piece.start, piece.end):
                slots.append(table[pos // bs] * bs + pos % bs)
            positions.extend(range(piece.start, piece.end))
        query_lens = [piece.end - piece.start for piece in pieces]
        if inputs is not None:
            self.counters.num_decode_tokens += len(ids)
        # Each table starts at the request's first kept block: the entries before it are
        # placeholders of released blocks (another request's KV by now), which a catch-up
        # row's window would otherwise reach. Attention indexes keys from the table's
        # start; positions (rotary) stay absolute, so in-window scores are unchanged.
        skip = [self._first_kept_position(piece.item) // bs for piece in pieces]
        layout = BatchLayout(
            query_lens=query_lens,
            num_computed_tokens=[p.start - n * bs for p, n in zip(pieces, skip, strict=True)],
            block_tables=[p.item.block_ids[n:] for p, n in zip(pieces, skip, strict=True)],
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            device=dev,
        )
        offsets = [self.model.rope_table_offset(len(p.item.prompt_token_ids)) for p in pieces]  # type: ignore[operator]
        rope = None
        if any(offsets):
            rows = [o for o, n in zip(offsets, query_lens, strict=True) for _ in range(n)]
            rope = torch.tensor(rows, dtype=torch.long, device=dev)
        metadata = self.backend.build_metadata(layout)
        ctx = ForwardContext(self.backend, metadata, self.kv_caches, rope)
        with forward_context(ctx):
            hidden: torch.Tensor = self.model(
                torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev),
            )
        return hidden


def _last_position(item: ScheduledRequest, new: list[int]) -> int:
    """Position of the step's last sampled token: the known tokens end before the
    proposals, then come the accepted proposals and the token sampled after them."""
    num_known_end = item.num_computed_tokens + item.num_scheduled_tokens - len(item.spec_token_ids)
    return num_known_end + len(new) - 1


def _tokens(item: ScheduledRequest, new: list[int], start: int, end: int) -> list[int]:
    """The request's tokens at positions [start, end): prompt, outputs, then `new`."""
    prompt, output = item.prompt_token_ids, item.output_token_ids
    np_, no = len(prompt), len(output)
    out = list(prompt[start:end]) if start < np_ else []
    if end > np_ and start < np_ + no:
        out += output[max(0, start - np_) : end - np_]
    if end > np_ + no:
        out += new[max(0, start - np_ - no) : end - np_ - no]
    return out


def _token_at(item: ScheduledRequest, new: list[int], pos: int) -> int:
    return _tokens(item, new, pos, pos + 1)[0]
