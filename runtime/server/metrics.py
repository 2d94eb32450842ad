"""Prometheus metrics: vLLM's series names under `pinnace:` (and `vllm:` on request).

Each server owns a CollectorRegistry, so several servers in one process don't clash.
Scheduler gauges and counters are read at scrape time from the engine thread's latest
snapshot; request counters and latency histograms are fed by the AsyncLLMEngine as
outputs are delivered (RequestObserver).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.async_engine import RequestStream
from pinnace.runtime.outputs import RequestOutput

# vLLM's buckets, so existing dashboards' quantile queries keep their resolution.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _SchedulerCollector(Collector):
    """Gauges and cumulative counters straight from the scheduler's stats."""

    def __init__(
        self,
        prefixes: Sequence[str],
        model_name: str,
        stats: Callable[[], SchedulerStats],
        max_loras: int | None = None,
        speculative: bool = False,
    ) -> None:
        self.prefixes = prefixes
        self.model_name = model_name
        self.stats = stats
        self.max_loras = max_loras  # None: LoRA off, no lora_requests_info
        self.speculative = speculative  # vLLM's spec_decode_* series only when on

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for p in self.prefixes:
            yield self._gauge(
                f"{p}:num_requests_running", "Requests in the running batch.", s.num_running_reqs
            )
            yield self._gauge(
                f"{p}:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting_reqs
            )
            yield self._gauge(
                f"{p}:kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (1 = full).",
                s.kv_cache_usage,
            )
            yield self._counter(
                f"{p}:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            )
            yield self._counter(
                f"{p}:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
            )
            yield self._counter(
                f"{p}:num_preemptions", "Requests preempted to free KV cache.", s.num_preemptions
            )
            if self.max_loras is not None:
                yield self._lora_info(p, s)
            if self.speculative:
                yield from self._spec_decode(p, s)

    def _spec_decode(self, prefix: str, s: SchedulerStats) -> Iterator[Metric]:
        """vLLM's speculative decoding counters (acceptance rate = accepted / draft tokens)."""
        spec = s.spec_decoding
        yield self._counter(
            f"{prefix}:spec_decode_num_drafts", "Proposal lists verified.", spec.num_drafts
        )
        yield self._counter(
            f"{prefix}:spec_decode_num_draft_tokens",
            "Proposed tokens verified.",
            spec.num_draft_tokens,
        )
        yield self._counter(
            f"{prefix}:spec_decode_num_accepted_tokens",
            "Proposed tokens accepted.",
            spec.num_accepted_tokens,
        )
        family = CounterMetricFamily(
            f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per position in the proposal.",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(spec.num_accepted_tokens_per_pos):
            family.add_metric([self.model_name, str(position)], count)
        yield family

    def _lora_info(self, prefix: str, s: SchedulerStats) -> Metric:
        """vLLM's lora_requests_info: the adapters in use as labels, the time as value."""
        family = GaugeMetricFamily(
            f"{prefix}:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        waiting = ",".join(sorted(s.waiting_lora_adapters))
        running = ",".join(sorted(s.running_lora_adapters))
        family.add_metric([str(self.max_loras), waiting, running], time.time())
        return family

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


FINISH_REASONS = ("stop", "length", "abort")


class _Series:
    """One metric under every prefix, its children labelled with the model name up front
    (so the series exist, at 0, before the first request: dashboards see them at once)."""

    def __init__(self, children: list[Any]) -> None:
        self.children = children

    def inc(self, amount: float = 1.0) -> None:
        for child in self.children:
            child.inc(amount)

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class ServingMetrics:
    """Owns the registry; observes requests through the AsyncLLMEngine's observer hooks."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], SchedulerStats],
        prefixes: Sequence[str] = ("pinnace",),
        max_loras: int | None = None,
        speculative: bool = False,
    ) -> None:
        self.model_name = model_name
        self.prefixes = list(prefixes)
        self.registry = CollectorRegistry()
        self.registry.register(
            _SchedulerCollector(prefixes, model_name, stats, max_loras, speculative)
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        success = [
            Counter(f"{p}:request_success", "Finished requests by finish reason.",
                    ["model_name", "finished_reason"], registry=self.registry)
            for p in prefixes
        ]  # fmt: skip
        self.request_success = {
            reason: _Series([c.labels(model_name, reason) for c in success])
            for reason in FINISH_REASONS
        }
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        )
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS
        )

    def _counter(self, name: str, doc: str) -> _Series:
        return _Series(
            [
                Counter(f"{p}:{name}", doc, ["model_name"], registry=self.registry).labels(
                    self.model_name
                )
                for p in self.prefixes
            ]
        )

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> _Series:
        return _Series(
            [
                Histogram(
                    f"{p}:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry
                ).labels(self.model_name)
                for p in self.prefixes
            ]
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- RequestObserver ---------------------------------------------------------------------

    def on_output(self, stream: RequestStream, output: RequestOutput, num_new_tokens: int) -> None:
        if num_new_tokens <= 0 or stream.last_token_time is None:
            return
        if stream.previous_token_time is None:
            self.ttft.observe(stream.last_token_time - stream.arrival_time)
        else:
            # One step brings one token per sample: each gap is one inter-token latency.
            self.itl.observe(stream.last_token_time - stream.previous_token_time)

    def on_finish(self, stream: RequestStream, finish_reason: str) -> None:
        self.prompt_tokens.inc(stream.num_prompt_tokens)
        self.generation_tokens.inc(stream.num_generation_tokens)
        self.request_success.get(finish_reason, self.request_success["stop"]).inc()
        self.e2e.observe(time.monotonic() - stream.arrival_time)
        if stream.scheduled_time is not None:
            self.queue_time.observe(max(0.0, stream.scheduled_time - stream.arrival_time))
