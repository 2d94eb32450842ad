"""WaitingLimit: the server's --max-waiting-requests, judged from the front end.

The front end sees the scheduler's counters only as of the core's last step, and adds it
sent since may not have reached the core yet. So the waiting queue is projected: the
requests in flight that the free batch slots will not take wait too.
"""

from __future__ import annotations

from pinnace.runtime.core.outputs import SchedulerStats
from pinnace.runtime.engine.streams import QueueFullError


class WaitingLimit:
    def __init__(self, max_waiting_requests: int | None, max_num_seqs: int) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be at least 1, got {max_waiting_requests}."
            )
        self.max_waiting_requests = max_waiting_requests
        self.max_num_seqs = max_num_seqs
        # Scheduler requests sent and taken in by the core: the difference is in flight.
        self.num_sent_adds = 0
        self.num_applied_adds = 0

    def check_room(self, stats: SchedulerStats, num_new: int) -> None:
        """Raises QueueFullError if `num_new` more requests would pass the limit."""
        if self.max_waiting_requests is None:
            return
        waiting = self.projected_waiting(stats)
        if waiting + num_new > self.max_waiting_requests:
            raise QueueFullError(
                f"the server is busy: {waiting} requests are waiting "
                f"(max_waiting_requests={self.max_waiting_requests}); retry later."
            )

    def projected_waiting(self, stats: SchedulerStats) -> int:
        """Waiting requests once the adds still in flight are applied: those beyond the
        free batch slots will wait (while some wait already, no slot is free: FCFS)."""
        in_flight = self.num_sent_adds - self.num_applied_adds
        free = 0
        if stats.num_waiting_reqs == 0:
            free = max(0, self.max_num_seqs - stats.num_running_reqs)
        return stats.num_waiting_reqs + max(0, in_flight - free)
