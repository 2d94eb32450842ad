"""The engine core's one interface to the model: execute(SchedulerOutput) on every rank.

    EngineCore --SchedulerOutput--> Executor --> rank 0 (driver, this process): samples
                                            \\-> ranks 1..N-1 (worker processes): forward
                                                 only, their shard of every layer

The scheduler runs once, in the driver; the workers rebuild each step's SchedulerOutput
from the driver's broadcast deltas (step_messages.py; never re-derived) and take part in
the forward's collectives. `InprocExecutor` is the one-rank case: the model in this
process, no extra processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import ModelRunnerOutput, SchedulerOutput
from pinnace.runtime.engine.setup import EngineParts, build_engine_parts


class WorkerDiedError(RuntimeError):
    """A rank of the group is gone: the engine cannot step any more."""


class Executor(ABC):
    """Runs each step on every rank; `parts` are the driver's (rank 0's) engine parts."""

    parts: EngineParts
    world_size: int = 1

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """The driver's result (only it samples) once every rank ran the step."""

    def check_health(self) -> None:  # noqa: B027 - one rank: nothing to check
        """WorkerDiedError when a rank is gone (cheap: called about once a second)."""

    def shutdown(self) -> None:  # noqa: B027 - one rank: nothing to stop
        """Stop the worker ranks (idempotent)."""

    def abandon(self, reason: str) -> None:  # noqa: B027 - one rank: nothing to tell
        """The engine stops abnormally: shutdown then kills the ranks instead of closing
        the group in order, so other nodes see their leader gone (and exit non-zero)."""


class InprocExecutor(Executor):
    """One rank, in the caller's process: today's path."""

    def __init__(self, config: EngineConfig) -> None:
        self.parts = build_engine_parts(config)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.parts.runner.execute(sched)


def make_executor(config: EngineConfig) -> Executor:
    if config.world_size == 1:
        return InprocExecutor(config)
    from pinnace.runtime.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config)
