"""Where serving time goes: wall seconds per named phase, per process, on demand.

With PINNACE_PROFILE_DIR set, each process that serves (the engine core, the front end, an
offline `LLM`) times its phases and writes one JSON summary there when it stops:

    core       poll_idle (waiting for work), commands, schedule, execute, update,
               encode, send (and send_cpu, the thread's CPU time in it: on a busy
               machine waking ZeroMQ's I/O thread can cost the core its CPU for a
               scheduler slice); each step's execute time by batch size, with or without a
               prompt in it, and by the tokens it ran; how long a request waited from
               arrival to its first step
    front end  decode, process (detokenize, stop strings), deliver, sse (building chunks);
               a request's arrival -> first step -> first token delivered, and (streamed
               completions) from the route taking the request to its first text chunk
               written, the server's share of the time to first token
    both       gc0 / gc1 / gc2: the pause of each garbage collection, by generation

and both report the process's CPU seconds over its wall time, which shows two processes
contending for the cores. Unset, `profile()` is a null object and costs a method call.

Memory is bounded for a long-running server: each phase (and batch size) keeps an exact
count and total of all its samples ("n", "total", "mean": the process's lifetime), but
only its last MAX_SAMPLES samples, so p50 / p90 / p99 describe that recent window once a
phase has more.
`hack/bench/serving_profile.py` reads the files.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from collections import defaultdict, deque
from typing import Any

ENV = "PINNACE_PROFILE_DIR"
# Samples kept per phase for the percentiles (8 bytes each plus deque overhead: well
# under 1 MiB per phase); count and total are kept over all samples.
MAX_SAMPLES = 65536


class Samples:
    """One phase's timings: count and total over all of them, the last MAX_SAMPLES kept."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=MAX_SAMPLES)

    def append(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.recent.append(value)

    def __getitem__(self, index: int) -> float:
        return self.recent[index]

    def __len__(self) -> int:
        return self.n


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
        self.phases: dict[str, Samples] = defaultdict(Samples)
        # execute seconds by (batch size, has a prompt in it)
        self.steps: dict[tuple[int, bool], Samples] = defaultdict(Samples)
        # and by the tokens (rows) it ran: CPU matmuls cost by row blocks (AMX tiles are
        # 16 rows), so 17 decodes can cost more over 16 than 16 over 8
        self.steps_by_tokens: dict[int, Samples] = defaultdict(Samples)
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self._t = self.wall0
        self._cpu = self.cpu0
        self._dumped = False
        self._gc_start = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Each collection's pause as phase "gc<generation>". A full one (gc2) walks every
        tracked object: 150-800 ms in a serving process, which holds a million or so after
        start-up; none ran while serving in 190 s of issue #18's bench, so nothing here
        freezes the start-up heap (vLLM's gc.freeze) yet."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.phases[f"gc{info['generation']}"].append(time.perf_counter() - self._gc_start)

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
        self.steps_by_tokens[num_tokens].append(seconds)
        self.phases["step_tokens"].append(float(num_tokens))

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        phases = {name: _stats(v) for name, v in sorted(self.phases.items())}
        steps = {
            f"{n}{'+prompt' if prompt else ''}": _stats(v)
            for (n, prompt), v in sorted(self.steps.items())
        }
        by_tokens = {str(n): _stats(v) for n, v in sorted(self.steps_by_tokens.items())}
        return {"role": self.role, "pid": os.getpid(), "wall_s": wall, "cpu_s": cpu,
                "cpu_per_wall": cpu / max(wall, 1e-9), "phases": phases,
                "execute_by_batch": steps, "execute_by_tokens": by_tokens}  # fmt: skip

    def dump(self) -> None:
        if self._dumped or not self.phases:
            return
        self._dumped = True
        path = os.path.join(self.folder, f"{self.role}-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(self.summary(), f, indent=1)


def _stats(samples: Samples) -> dict[str, float]:
    """Count, total and mean over all samples; percentiles over the last MAX_SAMPLES."""
    ordered = sorted(samples.recent)
    k = len(ordered)
    return {"n": samples.n, "total": samples.total, "mean": samples.total / samples.n,
            "p50": ordered[k // 2], "p90": ordered[min(k - 1, k * 9 // 10)],
            "p99": ordered[min(k - 1, k * 99 // 100)]}  # fmt: skip


_profiles: dict[str, NullProfile] = {}


def profile(role: str) -> NullProfile:
    """This process's profile for `role` (written at exit); a NullProfile unless
    PINNACE_PROFILE_DIR is set."""
    found = _profiles.get(role)
    if found is None:
        folder = os.environ.get(ENV)
        found = StepProfile(role, folder) if folder else NullProfile()
        if isinstance(found, StepProfile):
            gc.callbacks.append(found.on_gc)
        _profiles[role] = found
        atexit.register(found.dump)  # a multiprocessing child calls dump() itself
    return found
