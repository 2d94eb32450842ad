"""A request as the scheduler sees it: token ids and how many of them have KV computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pinnace.runtime.core.outputs import Logprob
from pinnace.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, stop token or stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or the context length
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    """Token accounting: `num_computed_tokens` catches up with `num_tokens` step by step.

    Prefill, chunked prefill, prefix-cache hits and recompute after preemption are all the
    same thing: the scheduler schedules `num_tokens - num_computed_tokens` (capped) tokens.
    A sampled token is appended only once every known token has its KV computed.

    Speculative decoding: `spec_token_ids` are proposed tokens kept apart from the known
    ones (never in all_token_ids, so never hashed into the prefix cache). A step computes
    KV for them too; after verification `num_computed_tokens` is rolled back past the
    rejected ones, whose KV slots the next step overwrites.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: never None here
    # Keys the prefix cache so different LoRA adapters (or salts) never share KV blocks.
    cache_salt: str | None = None
    lora_id: int = 0  # the engine's key of the request's adapter; 0: the base model
    lora_name: str | None = None  # for stats
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first schedule; -1: not yet
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Chained hashes of this request's full blocks, filled lazily by the KV cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    # Filled chunk by chunk: entry j scores prompt token j + 1 (prompt_logprobs requests).
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asks prompt logprobs and does not hold them all yet."""
        wanted = self.sampling_params.prompt_logprobs is not None
        return wanted and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
