"""Prometheus metrics: vLLM's series names under `pinnace:` (and `vllm:` on request).

Each server owns a CollectorRegistry, so several servers in one process don't clash.
Scheduler gauges and counters are read at scrape time from the engine thread's latest
snapshot; request counters and latency histograms are fed by the AsyncLLMEngine as
outputs are delivered (RequestObserver).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.async_engine import RequestStream
from pinnace.runtime.outputs import RequestOutput
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self, prefixes: Sequence[str], model_name: str, stats: Callable[[], SchedulerStats]
    ) -> None:
        self.prefixes = prefixes
        self.model_name = model_name
        self.stats = stats

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

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


class ServingMetrics:
    """Owns the registry; observes requests through the AsyncLLMEngine's observer hooks."""

    def __init__(
        self,
        model_name: str,
        stats: Callable[[], SchedulerStats],
        prefixes: Sequence[str] = ("pinnace",),
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(prefixes, model_name, stats))
        reg, labels = self.registry, ["model_name"]
        self._prompt_tokens = [
            Counter(f"{p}:prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
            for p in prefixes
        ]
        self._generation_tokens = [
            Counter(f"{p}:generation_tokens", "Tokens generated.", labels, registry=reg)
            for p in prefixes
        ]
        self._success = [
            Counter(
                f"{p}:request_success",
                "Finished requests by finish reason.",
                [*labels, "finished_reason"],
                registry=reg,
            )
            for p in prefixes
        ]
        self._ttft = self._histograms(
            prefixes, "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self._itl = self._histograms(
            prefixes, "inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        )
        self._e2e = self._histograms(
            prefixes, "e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS
        )
        self._queue = self._histograms(
            prefixes, "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS
        )

    def _histograms(
        self, prefixes: Sequence[str], name: str, doc: str, buckets: Sequence[float]
    ) -> list[Histogram]:
        return [
            Histogram(f"{p}:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry)
            for p in prefixes
        ]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- RequestObserver ---------------------------------------------------------------------

    def on_output(self, stream: RequestStream, output: RequestOutput, num_new_tokens: int) -> None:
        if num_new_tokens <= 0 or stream.last_token_time is None:
            return
        if stream.previous_token_time is None:
            for h in self._ttft:
                h.labels(self.model_name).observe(stream.last_token_time - stream.arrival_time)
        else:
            # One step brings one token per sample: each gap is one inter-token latency.
            gap = stream.last_token_time - stream.previous_token_time
            for h in self._itl:
                h.labels(self.model_name).observe(gap)

    def on_finish(self, stream: RequestStream, finish_reason: str) -> None:
        now = time.monotonic()
        name = self.model_name
        for c in self._prompt_tokens:
            c.labels(name).inc(stream.num_prompt_tokens)
        for c in self._generation_tokens:
            c.labels(name).inc(stream.num_generation_tokens)
        for c in self._success:
            c.labels(name, finish_reason).inc()
        for h in self._e2e:
            h.labels(name).observe(now - stream.arrival_time)
        if stream.scheduled_time is not None:
            for h in self._queue:
                h.labels(name).observe(max(0.0, stream.scheduled_time - stream.arrival_time))
