"""Splitting an embeddings call into forwards of at most the step token budget.

Prompts that fit the budget are packed whole, several per forward; a longer prompt runs
alone in budget-sized pieces, its K/V kept across them (chunked prefill) and its rows
pooled once its last piece has run. Every forward writes K/V to one scratch cache of
scratch_blocks() blocks, reused from forward to forward:

    forward 1: [p0 p0 | p1 | p2 p2 p2]      packed: blocks 0.. of each prompt in turn
    forward 2: [p3 (0..budget)]             a long prompt, its blocks from 0
    forward 3: [p3 (budget..len)]           the same blocks, the earlier K/V still there
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Tokens start .. end - 1 of prompt `index`, whose K/V go to blocks first_block.."""

    index: int
    start: int
    end: int
    first_block: int


def plan_embed_forwards(lens: list[int], budget: int, block_size: int) -> list[list[Piece]]:
    """The forwards of an embeddings call, prompts in order: each at most `budget` tokens
    and ceil(budget / block_size) blocks, a prompt longer than the budget alone."""
    forwards: list[list[Piece]] = []
    current: list[Piece] = []
    used_tokens = used_blocks = 0
    capacity = -(-budget // block_size)
    for index, n in enumerate(lens):
        blocks = -(-n // block_size)
        if n > budget:  # alone, in pieces
            if current:
                forwards.append(current)
                current, used_tokens, used_blocks = [], 0, 0
            forwards.extend([Piece(index, s, min(s + budget, n), 0)] for s in range(0, n, budget))
            continue
        if used_tokens + n > budget or used_blocks + blocks > capacity:
            forwards.append(current)
            current, used_tokens, used_blocks = [], 0, 0
        current.append(Piece(index, 0, n, used_blocks))
        used_tokens, used_blocks = used_tokens + n, used_blocks + blocks
    if current:
        forwards.append(current)
    return forwards


def scratch_blocks(forwards: list[list[Piece]], block_size: int) -> int:
    """Blocks of the scratch cache the forwards need: at most the budget's, or the longest
    prompt's where it is longer."""
    return max(p.first_block + -(-p.end // block_size) for pieces in forwards for p in pieces)
