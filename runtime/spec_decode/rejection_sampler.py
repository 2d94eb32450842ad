"""Verification of proposed tokens, row by row, then per request.

A request with k proposals d_1..d_k has k + 1 logits rows: row j (0-based) is the target's
distribution for the token after d_1..d_j. Each row gives a verdict, `accepted[j]` (does
row j keep d_{j+1}?) and `fallback[j]` (the token row j emits when it does not, or, for
the last row, the bonus token). A request emits d_1..d_a and then fallback[a], where a is
its first rejected row (a = k when all are accepted):

    rows:      r0    r1    r2    r3        (k = 3)
    accepted:  yes   yes   no    -
    emitted:   d_1   d_2   fallback[2]

Greedy rows accept d exactly when it is the argmax, so the output equals non-speculative
greedy decoding. Sampled rows use rejection sampling (Leviathan et al. 2023; Chen et al.
2023): accept d with probability min(1, p(d) / q(d)); on rejection draw from the residual
max(0, p - q) renormalised; the bonus row draws from p. Every emitted token is then
distributed as p. Proposers here are deterministic (q is one-hot at d, so accept with
p(d) and the residual is p without d) unless `draft_probs` is given.
"""

from __future__ import annotations

import torch


def greedy_verdicts(
    target_argmax: torch.Tensor, draft_flat: torch.Tensor, is_draft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([R] bool accepted, [R] long fallback) for greedy rows."""
    return is_draft & (target_argmax == draft_flat), target_argmax


def rejection_verdicts(
    target_probs: torch.Tensor,
    draft_flat: torch.Tensor,
    is_draft: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([R] bool accepted, [R] long fallback) for sampled rows.

    target_probs: [R, V] the sampling distribution p of each row; draft_flat: [R] the
    proposal each row scores (anything on bonus rows, where is_draft is False);
    uniforms: [R] in [0, 1); noise: [R, V] Exp(1) draws (the exponential race: argmax of
    w / noise draws from w normalised); draft_probs: [R, V] the proposer's q, or None for
    one-hot proposals.
    """
    index = draft_flat[:, None]
    p_draft = target_probs.gather(1, index)[:, 0]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
        residual = target_probs.scatter(1, index, 0.0)
    else:
        q_draft = draft_probs.gather(1, index)[:, 0]
        residual = (target_probs - draft_probs).clamp_min(0.0)
    # u < p / q, written without the division (q may be 0 where p is too).
    accepted = is_draft & (uniforms * q_draft < p_draft)
    weights = torch.where(is_draft[:, None], residual, target_probs)
    return accepted, (weights / noise).argmax(dim=-1)


def emitted_tokens(
    draft_token_ids: list[list[int]], accepted: list[bool], fallback: list[int]
) -> list[list[int]]:
    """Per request: its accepted proposals, then the fallback of its first rejected row."""
    out = []
    row = 0
    for drafts in draft_token_ids:
        tokens = []
        for j, draft in enumerate(drafts):
            if not accepted[row + j]:
                tokens.append(fallback[row + j])
                break
            tokens.append(draft)
        else:
            tokens.append(fallback[row + len(drafts)])
        out.append(tokens)
        row += len(drafts) + 1
    return out
