"""Where serving time goes: wall seconds per named phase, per process, on demand.

With PINNACE_PROFILE_DIR set, each process that serves (the engine core, the front end, an
offline `LLM`) times its phases and writes one JSON summary there when it stops:

    core       poll_idle (waiting for work), commands, schedule, execute, update,
               encode, send; each step's execute time by batch size, with or without a
               prompt in it; how long a request waited from arrival to its first step
    front end  decode, process (detokenize, stop strings), deliver, sse (building chunks);
               a request's arrival -> first step -> first token delivered

and both report the process's CPU seconds over its wall time, which shows two processes
contending for the cores. Unset, `profile()` is a null object and costs a method call.
`hack/bench/serving_profile.py` reads the files.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

ENV = "PINNACE_PROFILE_DIR"


class NullProfile:
    enabled = False

    def start(self) -> None:
        pass

    def lap(self, name: str) -> None:
        pass

    def add(self, name: str, seconds: float) -> None:
        pass

    def step(self, num_reqs: int, num_tokens: int, has_prompt: bool, seconds: float) -> None:
        pass

    def dump(self) -> None:
        pass


class StepProfile(NullProfile):
    """Phase timings of one process (`role`: "core", "frontend", "offline")."""

    enabled = True

    def __init__(self, role: str, folder: str) -> None:
        self.role = role
        self.folder = folder
        self.phases: dict[str, list[float]] = defaultdict(list)
        # execute seconds by (batch size, has a prompt in it)
        self.steps: dict[tuple[int, bool], list[float]] = defaultdict(list)
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self._t = self.wall0
        self._cpu = self.cpu0
        self._dumped = False

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Seconds since `start` or the last lap, as phase `name` (and, for "execute", the
        process's CPU seconds meanwhile as "execute_cpu": all its threads, so 2 threads
        that never wait give twice the wall time)."""
        now = time.perf_counter()
        self.phases[name].append(now - self._t)
        self._t = now
        if name == "schedule":  # execute begins
            self._cpu = time.process_time()
        elif name == "execute":
            self.phases["execute_cpu"].append(time.process_time() - self._cpu)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name].append(seconds)

    def step(self, num_reqs: int, num_tokens: int, has_prompt: bool, seconds: float) -> None:
        self.steps[(num_reqs, has_prompt)].append(seconds)
        self.phases["step_tokens"].append(float(num_tokens))

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        phases = {name: _stats(v) for name, v in sorted(self.phases.items())}
        steps = {
            f"{n}{'+prompt' if prompt else ''}": _stats(v)
            for (n, prompt), v in sorted(self.steps.items())
        }
        return {"role": self.role, "pid": os.getpid(), "wall_s": wall, "cpu_s": cpu,
                "cpu_per_wall": cpu / max(wall, 1e-9), "phases": phases,
                "execute_by_batch": steps}  # fmt: skip

    def dump(self) -> None:
        if self._dumped or not self.phases:
            return
        self._dumped = True
        path = os.path.join(self.folder, f"{self.role}-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(self.summary(), f, indent=1)


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    return {"n": n, "total": sum(ordered), "mean": statistics.fmean(ordered),
            "p50": ordered[n // 2], "p90": ordered[min(n - 1, n * 9 // 10)],
            "p99": ordered[min(n - 1, n * 99 // 100)]}  # fmt: skip


_profiles: dict[str, NullProfile] = {}


def profile(role: str) -> NullProfile:
    """This process's profile for `role` (written at exit); a NullProfile unless
    PINNACE_PROFILE_DIR is set."""
    found = _profiles.get(role)
    if found is None:
        folder = os.environ.get(ENV)
        found = StepProfile(role, folder) if folder else NullProfile()
        _profiles[role] = found
        atexit.register(found.dump)  # a multiprocessing child calls dump() itself
    return found
