"""What the model runner asks of a proposer after each step's sampling."""

from __future__ import annotations

from typing import Protocol

from pinnace.runtime.core.outputs import ScheduledRequest


class Proposer(Protocol):
    def propose(self, items: list[ScheduledRequest], sampled: list[list[int]]) -> list[list[int]]:
        """Per item, up to k tokens to follow its prompt + output tokens and then its
        `sampled` tokens of this step (an empty list: no proposal)."""
        ...
