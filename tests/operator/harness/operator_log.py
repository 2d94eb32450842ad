"""What the operator says it did, stamped with the API server's request sequence number.

Request i to the emulator has sequence number i (its place in kmock's request log). Each log
record the operator emits while a test runs is stamped with the number of requests received
so far, so "everything that pass did" is the requests before its "reconcile finished" record,
and "a pass that saw the test's change" is one whose "reconcile started" record comes after
the change's request. Two sources, both real output of the running operator:

- ours: pinnace.operator.handlers logs "reconcile started" / "reconcile finished" around
  each pass, with `llmdeployment="namespace/name"` on the record;
- kopf's: "Handling cycle is finished, waiting for new changes." once kopf has run an
  object's handlers and written its own bookkeeping (annotations) for that event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

KOPF_CYCLE_FINISHED = "Handling cycle is finished, waiting for new changes."
OURS, KOPFS = "pinnace.operator.handlers", "kopf.objects"


@dataclass(frozen=True)
class Signal:
    seq: int  # requests the API server had received when the record was emitted
    subject: str  # "namespace/name" of an LLMDeployment, or "Kind/namespace/name" (kopf)
    message: str  # "reconcile started", "reconcile finished" or "cycle finished"


class OperatorLog(logging.Handler):
    """Collects the operator's signals while attached (see `attached`)."""

    def __init__(self, seq: Callable[[], int]) -> None:
        super().__init__(logging.DEBUG)
        self._seq = seq
        self._lock = threading.Lock()
        self.signals: list[Signal] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == OURS and hasattr(record, "llmdeployment"):
            subject, message = str(record.llmdeployment), record.getMessage()
        elif record.name == KOPFS and record.getMessage() == KOPF_CYCLE_FINISHED:
            ref = getattr(record, "k8s_ref", {})
            subject, message = f"{ref['kind']}/{ref['namespace']}/{ref['name']}", "cycle finished"
        else:
            return
        with self._lock:
            self.signals.append(Signal(self._seq(), subject, message))

    def snapshot(self) -> list[Signal]:
        with self._lock:
            return list(self.signals)

    @contextmanager
    def attached(self) -> Iterator[OperatorLog]:
        """Receive our debug records and kopf's cycle ends (levels restored afterwards).
        kopf's other debug records (whole object bodies) are dropped at its logger: they
        are many and costly to format, and nobody was listening for them before."""
        ours, kopfs = logging.getLogger(OURS), logging.getLogger(KOPFS)
        levels = ours.level, kopfs.level
        was_enabled = kopfs.getEffectiveLevel()

        def keep(record: logging.LogRecord) -> bool:
            return record.levelno >= was_enabled or record.msg == KOPF_CYCLE_FINISHED

        for lg in (ours, kopfs):
            lg.setLevel(logging.DEBUG)
            lg.addHandler(self)
        kopfs.addFilter(keep)
        try:
            yield self
        finally:
            kopfs.removeFilter(keep)
            for lg, level in zip((ours, kopfs), levels, strict=True):
                lg.removeHandler(self)
                lg.setLevel(level)


def passes(signals: list[Signal], subject: str) -> list[tuple[int, int | None]]:
    """(started, finished) sequence numbers of each pass of `subject`, finished None while
    it runs. Passes of one resource never overlap (the operator's gate), so each "finished"
    closes the pass the previous "started" opened."""
    out: list[tuple[int, int | None]] = []
    for signal in signals:
        if signal.subject != subject:
            continue
        if signal.message == "reconcile started":
            out.append((signal.seq, None))
        elif signal.message == "reconcile finished" and out and out[-1][1] is None:
            out[-1] = (out[-1][0], signal.seq)
    return out
