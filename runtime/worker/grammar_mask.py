"""Structured output in the sampler: one xgrammar matcher per constrained request.

Each step the matchers write the allowed next tokens into a packed bitmask ([N, V/32]
int32) and xgrammar masks the logits with it; sampled tokens then advance the matchers.
xgrammar is imported on first use (seconds): engines without constrained requests never
pay for it. A matcher is rebuilt from the request's output tokens when missing (after a preemption
dropped it), so its state always equals the tokens the request holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pinnace.runtime.engine.grammar_compiler import GrammarCompiler
from pinnace.runtime.worker.logits_processors import SamplingRow

if TYPE_CHECKING:
    import xgrammar as xgr


@dataclass
class _Matcher:
    matcher: xgr.GrammarMatcher
    num_accepted: int = 0


class GrammarMasks:
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[str, _Matcher] = {}
        self._bitmask: torch.Tensor | None = None

    def drop(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            self._matchers.pop(req_id, None)

    def _matcher(self, row: SamplingRow) -> _Matcher:
        state = self._matchers.get(row.req_id)
        if state is None:
            spec = row.params.structured_outputs
            assert spec is not None  # callers pass constrained rows only
            import xgrammar as xgr

            state = _Matcher(xgr.GrammarMatcher(self.compiler.compile(spec)))
            self._matchers[row.req_id] = state
        # Catch up with tokens sampled before this matcher existed (or that it missed).
        for token in row.output_token_ids[state.num_accepted :]:
            state.matcher.accept_token(token)
            state.num_accepted += 1
        return state

    def apply(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Mask, in place, every token a constrained row's grammar does not allow next."""
        idx = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
        if not idx:
            return
        bitmask = self._bitmask_for(len(rows), logits.shape[-1])
        for i in idx:
            state = self._matcher(rows[i])
            if state.matcher.is_terminated():
                bitmask[i] = -1  # done (ignore_eos ran past the end): nothing more to enforce
            else:
                state.matcher.fill_next_token_bitmask(bitmask, i)
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask[: len(rows)], indices=idx)

    def accept(self, rows: list[SamplingRow], tokens: list[list[int]]) -> None:
        """Advance each constrained row's matcher by its new tokens (one per step: the
        runner makes no proposals for constrained requests, whose mask would need the
        matcher advanced through each proposal)."""
        for row, new in zip(rows, tokens, strict=True):
            if row.params.structured_outputs is None:
                continue
            state = self._matchers.get(row.req_id)
            for token in new:
                if state is None or state.matcher.is_terminated():
                    break
                state.matcher.accept_token(token)
                state.num_accepted += 1  # counted either way: it is in the request's output

    def _bitmask_for(self, num_rows: int, vocab_size: int) -> torch.Tensor:
        """A reused [rows, V/32] buffer, grown when a step has more rows."""
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < num_rows:
            import xgrammar as xgr

            bitmask = xgr.allocate_token_bitmask(max(num_rows, 32), vocab_size)
            self._bitmask = bitmask
        return bitmask
