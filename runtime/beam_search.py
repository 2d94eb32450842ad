"""Beam search (vLLM's `LLM.beam_search` shape) as steps over the engine, scored and
stopped exactly as transformers' `generate(num_beams=...)`.

Each step asks the engine for one token per live beam with its top K logprobs, K =
max(2, 1 + number of EOS tokens) * beam_width (transformers' `beams_to_keep`: enough that
beam_width candidates survive even if every beam's best is an EOS). Of the K best
extensions by cumulative logprob:

    live       the beam_width best that do not end in EOS continue;
    finished   those among the first beam_width that end in EOS (or reach max_tokens)
               enter the finished set, scored cum_logprob / generated_len ** length_penalty
               (the EOS token counted); the set keeps the beam_width best.

Search stops at max_tokens, or earlier by `early_stopping` (transformers' settings):
True: once beam_width beams have finished; False (its default): once the best live beam,
scored at its current length, cannot beat the worst finished one; "never": the same, but
scored at max_tokens when length_penalty > 0 (a longer beam could still win). The result
is the finished set, best first.

Beams of one prompt share their KV blocks through the prefix cache: every full block of
the prompt and of a common prefix is held once, ref-counted, and never written again
(blocks are immutable once full), so only the last, partial block is recomputed per beam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pinnace.runtime.sampling_params import ParameterError, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False  # transformers' (vLLM has none)

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}."
            )

    def num_candidates(self, num_eos_tokens: int) -> int:
        """Extensions to look at per step (and top logprobs to ask per beam)."""
        return max(2, 1 + num_eos_tokens) * self.beam_width

    def check_logprobs_room(
        self, eos_token_ids: frozenset[int], max_logprobs: int, param: str = "beam_width"
    ) -> None:
        """ParameterError naming `param` (the width's name where the caller set it: the
        API's beam_width, the completions endpoint's n) when the per-step logprobs the search
        needs exceed the engine's max_logprobs, before any step is run."""
        num_eos = 0 if self.ignore_eos else len(eos_token_ids)
        needed = self.num_candidates(num_eos)
        if needed > max_logprobs:
            factor = needed // self.beam_width
            raise ParameterError(
                param,
                f"beam search with {param}={self.beam_width} needs the top {needed} logprobs "
                f"per step ({factor} x {param}), over this engine's max_logprobs="
                f"{max_logprobs}; use {param} <= {max_logprobs // factor} or start the engine "
                "with a larger max_logprobs.",
            )

    def step_params(self, eos_token_ids: frozenset[int]) -> SamplingParams:
        """What the engine runs per live beam and step: one token, with the top
        num_candidates logprobs (the global best K are among each beam's best K)."""
        num_eos = 0 if self.ignore_eos else len(eos_token_ids)
        return SamplingParams(
            temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=self.num_candidates(num_eos)
        )


@dataclass
class BeamSearchSequence:
    """One beam: prompt and generated token ids, and the generated tokens' logprob sum."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    text: str | None = None
    is_finished: bool = False  # ended in EOS (else it reached max_tokens)

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, length_penalty: float) -> float:
    return beam.cum_logprob / (max(1, len(beam.output_tokens)) ** length_penalty)


@dataclass
class BeamSearchInstance:
    """The live and finished beams of one prompt; `beams` is empty once search is over."""

    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)  # best first
    # transformers' is_early_stop_heuristic_unsatisfied: a live beam may still beat the
    # worst finished one (always true while fewer than beam_width have finished).
    can_improve: bool = True

    def step(
        self,
        extensions: list[dict[int, float]],
        params: BeamSearchParams,
        eos_token_ids: frozenset[int],
    ) -> None:
        """Advance every live beam by its candidate tokens (token id -> logprob, one dict
        per beam in `self.beams` order), then keep or finish beams as transformers does."""
        eos = frozenset() if params.ignore_eos else eos_token_ids
        candidates = [
            BeamSearchSequence([*beam.tokens, token], beam.num_prompt_tokens, beam.cum_logprob + lp)
            for beam, tops in zip(self.beams, extensions, strict=True)
            for token, lp in tops.items()
        ]
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        candidates = candidates[: params.num_candidates(len(eos))]
        if not candidates:
            self.beams = []
            return
        length = len(candidates[0].output_tokens)
        at_max = length >= params.max_tokens
        width = params.beam_width
        full = len(self.completed) == width and params.early_stopping is True
        if self.can_improve and not full:
            for cand in candidates[:width]:
                if cand.tokens[-1] in eos or at_max:
                    cand.is_finished = cand.tokens[-1] in eos
                    self.completed.append(cand)
            self.completed.sort(key=lambda b: beam_score(b, params.length_penalty), reverse=True)
            del self.completed[width:]
        self.beams = [c for c in candidates if c.tokens[-1] not in eos][:width]
        self._check_improvement(params, length)
        full = len(self.completed) == width and params.early_stopping is True
        if at_max or full or not self.can_improve:
            self.beams = []

    def _check_improvement(self, params: BeamSearchParams, length: int) -> None:
        if len(self.completed) < params.beam_width or not self.beams:
            return
        penalty = params.length_penalty
        if params.early_stopping == "never" and penalty > 0.0:
            length = params.max_tokens
        best_possible = self.beams[0].cum_logprob / length**penalty
        worst = beam_score(self.completed[-1], penalty)
        self.can_improve = best_possible > worst

    def result(self, params: BeamSearchParams) -> BeamSearchOutput:
        """The finished beams, best first (live ones too if search was cut short)."""
        everything = [*self.completed, *self.beams]
        everything.sort(key=lambda b: beam_score(b, params.length_penalty), reverse=True)
        return BeamSearchOutput(everything[: params.beam_width])
