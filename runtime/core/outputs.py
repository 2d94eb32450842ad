"""The contracts between scheduling and compute: plain dataclasses, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from pinnace.runtime.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute KV for `token_ids` at positions from
    `num_computed_tokens`, and sample if `needs_sample`.

    With speculative decoding the last `len(spec_token_ids)` of `token_ids` are proposed
    tokens, not yet the request's: the runner verifies them and samples up to
    len(spec_token_ids) + 1 tokens (the accepted drafts, then one of its own):

        token_ids:  t_n  d_1  d_2  d_3      (t_n: the last known token)
        rows:       r0   r1   r2   r3       r_i scores d_{i+1}; r3 gives the bonus token
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams
    needs_sample: bool
    # Output tokens so far: sampling penalties and seeded generators need the history.
    num_output_tokens: int = 0
    # The request's own lists, shared (not copied): read-only for penalties and bad words.
    # Ranks other than the driver never sample: theirs have no output_token_ids.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    lora_id: int = 0  # the engine's key of the adapter (see LoRAManager); 0: base model
    # Top-k of the prompt logprobs this chunk's prompt rows owe (None: none owed).
    num_prompt_logprobs: int | None = None
    # Proposed tokens at the end of token_ids (only when needs_sample).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests that left since the last step (finished, aborted, preempted): runners drop
    # any per-request state (e.g. seeded generators) for them.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Logprobs:
    """Log-probabilities of one sampled token and the top alternatives (token id -> logprob)."""

    token_logprob: float
    top: dict[int, float]


@dataclass
class Logprob:
    """One token's log-probability and its rank in the distribution (vLLM's Logprob):
    1 + the number of tokens with a strictly greater logprob."""

    logprob: float
    rank: int


@dataclass
class ModelRunnerOutput:
    """Per request that sampled (absent: a partial prefill chunk): its new tokens in order,
    one or more (accepted drafts, then the runner's own token)."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # one per sampled token
    # Tokens proposed for the next step, per request (speculative decoding; empty without).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Per request asking prompt logprobs: one {token_id: Logprob} per prompt row of this
    # chunk that predicts a prompt token (row at position p scores prompt token p + 1).
    prompt_logprobs: dict[str, list[dict[int, Logprob]]] = field(default_factory=dict)


@dataclass
class SpecDecodingStats:
    """vLLM's speculative decoding counters (cumulative): verified proposal lists, their
    tokens, the accepted ones, and per position j the lists whose token j was accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for j in range(num_accepted_tokens):
            per_pos[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class SchedulerStats:
    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    # Adapter name -> requests (vLLM's running/waiting_lora_adapters); empty without LoRA.
    running_lora_adapters: dict[str, int] = field(default_factory=dict)
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)
    spec_decoding: SpecDecodingStats = field(default_factory=SpecDecodingStats)


@dataclass
class RequestUpdate:
    """What one step changed for one request: the engine turns these into user outputs."""

    req_id: str
    new_token_ids: list[int]  # in order; a stop ends the list (nothing past it)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] | None = None  # one per new token when asked
    # With the first sampled token of a request asking them: prompt logprobs, one per
    # prompt token after the first.
    prompt_logprobs: list[dict[int, Logprob]] | None = None
    num_cached_tokens: int = 0  # prefix-cache hit length when the request was admitted
