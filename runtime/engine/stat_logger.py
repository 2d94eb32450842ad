"""The periodic engine log line (vLLM's LoggingStatLogger): every `interval` seconds the
load, KV cache, prefix-cache hit rate, generation throughput and, with speculative
decoding, the acceptance rate over that interval. Pure Python; fed once per step."""

from __future__ import annotations

import logging
import time

from pinnace.runtime.core.outputs import SchedulerStats, SpecDecodingStats

logger = logging.getLogger("pinnace.runtime.stats")


class StatLogger:
    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last_time = time.monotonic()
        self._num_generated = 0
        self._last: SchedulerStats | None = None  # at the previous log line

    def observe(self, stats: SchedulerStats, num_generated: int, now: float | None = None) -> None:
        """One step's stats (cumulative counters) and the tokens it generated."""
        now = time.monotonic() if now is None else now
        self._num_generated += num_generated
        if now - self._last_time >= self.interval:
            line = self.line(stats, now - self._last_time)
            if stats.num_running_reqs or self._num_generated:  # quiet when idle, as vLLM
                logger.info(line)
            self._last_time, self._num_generated, self._last = now, 0, stats

    def line(self, stats: SchedulerStats, elapsed: float) -> str:
        last = self._last
        queries = stats.prefix_cache_queries - (last.prefix_cache_queries if last else 0)
        hits = stats.prefix_cache_hits - (last.prefix_cache_hits if last else 0)
        text = (
            f"Generation throughput: {self._num_generated / max(elapsed, 1e-9):.1f} tokens/s, "
            f"Running: {stats.num_running_reqs} reqs, Waiting: {stats.num_waiting_reqs} reqs, "
            f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%"
        )
        spec = _delta(stats.spec_decoding, last.spec_decoding if last else SpecDecodingStats())
        if spec.num_drafts:
            per_pos = ", ".join(
                f"{c / spec.num_drafts:.2f}" for c in spec.num_accepted_tokens_per_pos
            )
            text += (
                f", Spec decode acceptance rate: {100 * spec.acceptance_rate:.1f}%, "
                f"mean acceptance length: {1 + spec.num_accepted_tokens / spec.num_drafts:.2f}, "
                f"accepted {spec.num_accepted_tokens} of {spec.num_draft_tokens} proposed "
                f"(per position: {per_pos})"
            )
        return text


def _delta(now: SpecDecodingStats, before: SpecDecodingStats) -> SpecDecodingStats:
    per_pos = list(now.num_accepted_tokens_per_pos)
    for i, count in enumerate(before.num_accepted_tokens_per_pos):
        per_pos[i] -= count
    return SpecDecodingStats(
        now.num_drafts - before.num_drafts,
        now.num_draft_tokens - before.num_draft_tokens,
        now.num_accepted_tokens - before.num_accepted_tokens,
        per_pos,
    )
