"""Per-request output bookkeeping: the n samples of one user request and their text."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pinnace.runtime.core.outputs import Logprob, Logprobs, RequestUpdate
from pinnace.runtime.engine.detokenizer import IncrementalDetokenizer
from pinnace.runtime.outputs import CompletionOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams


@dataclass
class SampleState:
    """One of the n samples (one scheduler request)."""

    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def apply(self, update: RequestUpdate) -> str | None:
        """Record a step's tokens one at a time; returns a stop string if the text now
        contains one (the tokens after the one that completed it are dropped).

        A finished sample takes nothing more: a stop string found here reaches the core a
        step late across processes, so one more step's tokens for it may still arrive."""
        if self.finish_reason is not None:
            return None
        num_new = len(update.new_token_ids)
        for i, token_id in enumerate(update.new_token_ids):
            self.token_ids.append(token_id)
            if update.logprobs is not None:
                self._add_logprobs(token_id, update.logprobs[i])
            is_last = i == num_new - 1
            text_ids = [token_id]
            if is_last and update.finish_reason == "stop" and not self.detok.include_stop:
                text_ids = []  # as in vLLM, the EOS / stop token's text is left out
            stop = self.detok.update(text_ids)
            if stop is not None:
                # The text was cut at the stop string, so it is the reason even when the
                # same token also reached max_tokens (vLLM reports it the same way).
                self.finish_reason, self.stop_reason = "stop", stop
                return stop
        if update.finish_reason is not None:
            self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason
        return None

    def _add_logprobs(self, token_id: int, lp: Logprobs) -> None:
        entry = dict(lp.top)
        entry[token_id] = lp.token_logprob
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.append(entry)
        self.cumulative_logprob = (self.cumulative_logprob or 0.0) + lp.token_logprob

    def output(self) -> CompletionOutput:
        # A running sample's lists are copied: a stream may hold several outputs of one
        # request before its reader runs, and the next step appends. A finished sample's
        # lists never change again, so its (final) output shares them.
        finished = self.finish_reason is not None
        token_ids = self.token_ids if finished else list(self.token_ids)
        logprobs = self.logprobs
        if logprobs is not None and not finished:
            logprobs = list(logprobs)
        return CompletionOutput(
            index=self.index,
            text=self.detok.output_text(finished=finished),
            token_ids=token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=self.cumulative_logprob,
        )


class RequestState:
    """A user request fanned out into `n` scheduler requests ids `child_ids`."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.num_cached_tokens = 0
        # vLLM's shape: None for the first prompt token, then {token_id: logprob} each.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.params = params
        num = params.num_samples
        self.child_ids = [request_id] if num == 1 else [f"{request_id}#{i}" for i in range(num)]
        self.samples = {
            child: SampleState(
                i,
                IncrementalDetokenizer(
                    tokenizer,
                    prompt_token_ids,
                    params.skip_special_tokens,
                    params.stop_strings,
                    params.include_stop_str_in_output,
                ),
            )
            for i, child in enumerate(self.child_ids)
        }

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=self._outputs(),
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _outputs(self) -> list[CompletionOutput]:
        """Every sample; with best_of > n, once finished, the n of highest cumulative
        logprob (re-indexed 0..n-1, logprobs dropped unless asked for)."""
        outs = [s.output() for s in self.samples.values()]
        params = self.params
        if params.num_samples == params.n:
            return outs
        if not self.finished:
            return []
        best = sorted(outs, key=lambda o: o.cumulative_logprob or 0.0, reverse=True)[: params.n]
        for i, out in enumerate(best):
            out.index = i
            if params.logprobs is None:
                out.logprobs = None
        return best
