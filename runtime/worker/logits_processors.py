"""The sampler's logits processors: batched tensor ops over the rows that use each one.

Order (vLLM v1's, which agrees with transformers' for the processors both have):

    allowed_token_ids -> bad_words -> min_tokens -> logit_bias -> penalties   (raw logits)
    temperature -> min_p -> top-k / top-p                                      (in Sampler)

Each processor first picks the rows that need it (one pass over the rows) and touches only
those; a step where no row uses a processor costs one Python scan, no tensor work.
Per-row token lists are flattened into one index tensor (row index, token id) so that the
tensor work is one scatter per processor, not one per request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pinnace.runtime.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One request that samples this step. The token lists are the request's own (read
    only here): penalties and multi-token bad words need the history."""

    req_id: str
    params: SamplingParams
    num_output_tokens: int
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = field(default_factory=list)
    # Proposed tokens to verify (speculative decoding): the sampler gets one logits row
    # per proposal plus one, and expands this row into that many.
    draft_token_ids: Sequence[int] = ()


def _flat_index(
    token_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of ragged per-row token lists: ([T], [T])."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), device=device)
    return rows, tokens.long()


def apply_allowed_token_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    idx = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    if not idx:
        return
    lists = [rows[i].params.allowed_token_ids or [] for i in idx]
    sub, tokens = _flat_index(lists, logits.device)
    banned = torch.ones(len(idx), logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[sub, tokens] = False
    index = torch.tensor(idx, device=logits.device)
    logits[index] = logits[index].masked_fill(banned, NEG_INF)


def _ban(logits: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    if pairs:
        index = torch.tensor(pairs, device=logits.device).T
        logits[index[0], index[1]] = NEG_INF


def apply_bad_words(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Ban a bad word's last token when the tokens before it end the text so far (prompt
    and output, as transformers' NoBadWordsLogitsProcessor reads them)."""
    pairs: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        for word in row.params.bad_words_token_ids:
            prefix = word[:-1]
            if prefix and not _ends_with(row, prefix):
                continue
            pairs.append((i, word[-1]))
    _ban(logits, pairs)


def _ends_with(row: SamplingRow, prefix: list[int]) -> bool:
    out, prompt = row.output_token_ids, row.prompt_token_ids
    need = len(prefix)
    tail = (
        list(out[-need:]) if len(out) >= need else [*prompt[len(prompt) - need + len(out) :], *out]
    )
    return tail == prefix


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], eos: Sequence[int]) -> None:
    """Until min_tokens are out, EOS and the stop token ids are not candidates."""
    pairs = [
        (i, t)
        for i, r in enumerate(rows)
        if r.num_output_tokens < r.params.min_tokens
        for t in (*eos, *(r.params.stop_token_ids or ()))
    ]
    _ban(logits, pairs)


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    triples = [
        (i, t, b)
        for i, r in enumerate(rows)
        if r.params.logit_bias
        for t, b in r.params.logit_bias.items()
    ]
    if not triples:
        return
    row_idx, token_idx, bias = zip(*triples, strict=True)
    dev = logits.device
    logits.index_put_(
        (torch.tensor(row_idx, device=dev), torch.tensor(token_idx, device=dev)),
        torch.tensor(bias, dtype=logits.dtype, device=dev),
        accumulate=True,
    )


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """vLLM's penalties: repetition over prompt and output tokens (divide a positive logit,
    multiply a negative one), then frequency (per occurrence) and presence (once) over
    output tokens only.

    Only the (row, token) pairs a request has seen are touched, as flat indices into the
    logits (row * V + token): a few thousand entries instead of several dense [rows, V]
    passes, which cost a quarter of a batch-32 step on a 49k vocabulary."""
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return
    dev, (num_rows, vocab) = logits.device, logits.shape
    picked = [rows[i] for i in idx]
    row_ids = torch.tensor(idx, device=dev)
    flat = logits.view(-1)  # [N * V], the caller's tensor (contiguous logits rows)

    def per_row(values: list[float], default: float) -> torch.Tensor:
        """A value per logits row (default for rows without penalties)."""
        full = torch.full((num_rows,), default, dtype=logits.dtype, device=dev)
        full[row_ids] = torch.tensor(values, dtype=logits.dtype, device=dev)
        return full

    out_rows, out_tokens = _flat_index([r.output_token_ids for r in picked], dev)
    out_keys, counts = torch.unique(row_ids[out_rows] * vocab + out_tokens, return_counts=True)
    rep = [r.params.repetition_penalty for r in picked]
    if any(r != 1.0 for r in rep):
        prompt_rows, prompt_tokens = _flat_index([r.prompt_token_ids for r in picked], dev)
        prompt_keys = row_ids[prompt_rows] * vocab + prompt_tokens
        keys = torch.unique(torch.cat((prompt_keys, out_keys)))
        factor = per_row(rep, 1.0)[keys // vocab]
        values = flat[keys]
        flat[keys] = torch.where(values > 0, values / factor, values * factor)
    owners = out_keys // vocab
    freq = per_row([r.params.frequency_penalty for r in picked], 0.0)[owners]
    presence = per_row([r.params.presence_penalty for r in picked], 0.0)[owners]
    flat[out_keys] -= freq * counts.to(logits.dtype) + presence


def apply_min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor | None:
    """Mask of tokens below min_p times the row's top probability ([N, V] bool), or None
    when no row uses min_p. `probs` are after temperature."""
    if not any(p > 0.0 for p in min_p):
        return None
    threshold = torch.tensor(min_p, device=probs.device)[:, None] * probs.amax(-1, keepdim=True)
    return probs < threshold
