"""OutputProcessor: the front end's half of the engine, core updates -> user outputs.

The core steps scheduler requests and returns token ids; here each user request's n
samples are gathered, their text decoded incrementally and searched for stop strings.
A stop string is found here, after the core already ran the step, so the sample it ends
is returned in `stopped` for the caller to finish in the core (in-process: before the next
step; across processes: with the next message, one step later, as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pinnace.runtime.core.outputs import RequestUpdate
from pinnace.runtime.engine.engine_core import CoreRequest
from pinnace.runtime.engine.request_state import RequestState
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import RequestOutput
from pinnace.runtime.sampling_params import SamplingParams


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    # Scheduler ids whose sample a stop string ended: the core must stop them.
    stopped: list[str] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}  # by user request id
        self._child_to_parent: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
    ) -> list[CoreRequest]:
        """Track a (validated) user request; returns its scheduler requests for the core."""
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use.")
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer)
        self._states[request_id] = state
        requests = []
        for i, child_id in enumerate(state.child_ids):
            self._child_to_parent[child_id] = request_id
            child_params = params if params.num_samples == 1 else params.for_sample(i)
            request = CoreRequest(
                child_id, prompt_token_ids, child_params, max_tokens, cache_salt, lora_request
            )
            if arrival_time is not None:
                request.arrival_time = arrival_time
            requests.append(request)
        return requests

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a user request; returns its scheduler ids (for the core to abort)."""
        state = self._states.pop(request_id, None)
        if state is None:
            return []
        for child_id in state.child_ids:
            self._child_to_parent.pop(child_id, None)
        return state.child_ids

    def process(self, updates: list[RequestUpdate]) -> ProcessedOutputs:
        """One step's updates -> an output per user request that made progress."""
        result = ProcessedOutputs()
        touched: dict[str, RequestState] = {}
        for update in updates:
            parent = self._child_to_parent.get(update.req_id)
            if parent is None:
                continue  # aborted while the step ran
            state = self._states[parent]
            sample = state.samples[update.req_id]
            if sample.finish_reason is not None:
                continue  # a stop string ended it; the core ran one more step before knowing
            if sample.apply(update) is not None and update.finish_reason is None:
                result.stopped.append(update.req_id)
            if sample.index == 0:
                state.num_cached_tokens = update.num_cached_tokens
                if update.prompt_logprobs is not None:
                    state.prompt_logprobs = [None, *update.prompt_logprobs]
            touched[parent] = state
        for request_id, state in touched.items():
            result.outputs.append(state.output())
            if state.finished:
                self.abort_request(request_id)
        return result

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def request_ids(self) -> list[str]:
        return list(self._states)

    def num_unfinished_requests(self) -> int:
        return len(self._states)
