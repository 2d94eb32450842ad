"""Beam search (vLLM's `LLM.beam_search` shape) as steps over the engine.

Each step asks the engine for one token per live beam with its top 2 * beam_width
logprobs, then keeps the beam_width best extensions by cumulative logprob; an EOS
extension retires a beam into `completed`. Beams of one prompt share their KV blocks
through the prefix cache: every full block of the prompt and of a common prefix is held
once, ref-counted, and never written again (blocks are immutable once full), so only the
last, partial block is recomputed per beam.

Final ranking (transformers' BeamHypotheses): cumulative logprob / generated_len **
length_penalty, the EOS token counted in the length; all beams run to max_tokens unless
they end in EOS (early_stopping=False in transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")


@dataclass
class BeamSearchSequence:
    """One beam: prompt and generated token ids, and the generated tokens' logprob sum."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    text: str | None = None
    is_finished: bool = False

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
    """The live and finished beams of one prompt."""

    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)

    def step(
        self,
        extensions: list[dict[int, float]],
        params: BeamSearchParams,
        eos_token_ids: frozenset[int],
    ) -> None:
        """Advance every live beam by its candidate tokens (token id -> logprob, one dict
        per beam in `self.beams` order) and keep the beam_width best."""
        candidates: list[BeamSearchSequence] = []
        for beam, tops in zip(self.beams, extensions, strict=True):
            for token, logprob in tops.items():
                new = BeamSearchSequence(
                    [*beam.tokens, token], beam.num_prompt_tokens, beam.cum_logprob + logprob
                )
                candidates.append(new)
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        live: list[BeamSearchSequence] = []
        for rank, cand in enumerate(candidates):
            if len(live) == params.beam_width:
                break
            if not params.ignore_eos and cand.tokens[-1] in eos_token_ids:
                # transformers: an EOS beam retires if it ranks among the top beam_width.
                if rank < params.beam_width:
                    cand.is_finished = True
                    self.completed.append(cand)
            else:
                live.append(cand)
        self.beams = live

    def result(self, params: BeamSearchParams) -> BeamSearchOutput:
        everything = [*self.completed, *self.beams]
        everything.sort(key=lambda b: beam_score(b, params.length_penalty), reverse=True)
        return BeamSearchOutput(everything[: params.beam_width])
