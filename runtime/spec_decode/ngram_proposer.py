"""Prompt lookup (n-gram) proposals: find the request's last n tokens earlier in its own
prompt + output and propose the tokens that followed them there.

    tokens:  ... a b c d e ... x a b c      suffix "a b c" (n = 3) seen before
                     ^^^^^ proposed: d e ... (up to k tokens)

The longest n in [min_n, max_n] with a match wins; among its matches the most recent one
that still has k tokens after it (else the most recent). No model, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pinnace.runtime.core.outputs import ScheduledRequest


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.k = num_speculative_tokens

    def propose(self, items: list[ScheduledRequest], sampled: list[list[int]]) -> list[list[int]]:
        return [
            self.propose_one([*item.prompt_token_ids, *item.output_token_ids, *new])
            for item, new in zip(items, sampled, strict=True)
        ]

    def propose_one(self, token_ids: Sequence[int]) -> list[int]:
        """Up to k tokens to follow `token_ids` (the request's prompt + output)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows over tokens[:-1] start at 0 .. length - 1 - n: never the suffix itself.
            windows = sliding_window_view(tokens[:-1], n)  # [length - n, n]
            hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
            if hits.size == 0:
                continue
            full = hits[hits + n + self.k <= length]
            start = int(full[-1] if full.size else hits[-1]) + n
            return tokens[start : start + self.k].tolist()
        return []
