"""Read the step profiles (runtime/engine/step_profile.py) that `serving.py --profile DIR`
had every Pinnace process write: DIR/<engine>/<role>-<pid>.json -> one condensed dict.

Per engine and role (core, frontend, offline): CPU seconds per wall second of the
process, and per phase the count, total seconds and p50 / p90 in milliseconds; the core's
execute time by batch size (bins of sizes, steps with a prompt in them apart) and by the
tokens a step ran (bins of 16: the CPU matmuls' row blocks, where a step's cost jumps).
"""

from __future__ import annotations

import json
import os
from typing import Any

BINS = [(1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 1 << 30)]
NOT_MS = {"step_tokens"}  # phases that count tokens, not seconds


def read_profiles(folder: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for engine in sorted(os.listdir(folder)):
        path = os.path.join(folder, engine)
        if not os.path.isdir(path):
            continue
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name)) as f:
                raw = json.load(f)
            found.setdefault(engine, {}).setdefault(raw["role"], []).append(condense(raw))
    return found


def condense(raw: dict[str, Any]) -> dict[str, Any]:
    phases = {}
    for name, s in raw["phases"].items():
        scale = 1.0 if name in NOT_MS else 1000.0
        phases[name] = {
            "n": s["n"],
            "total_s": round(s["total"], 3),
            "p50": round(s["p50"] * scale, 3),
            "p90": round(s["p90"] * scale, 3),
        }
    return {"cpu_per_wall": round(raw["cpu_per_wall"], 3), "wall_s": round(raw["wall_s"], 1),
            "phases": phases, "execute_ms_by_batch": by_batch(raw["execute_by_batch"]),
            "execute_ms_by_tokens": by_tokens(raw.get("execute_by_tokens", {}))}  # fmt: skip


def by_batch(steps: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean execute ms and step count per (batch-size bin, prompt in the step or not)."""
    sums: dict[str, list[float]] = {}
    for key, s in steps.items():
        size = int(key.split("+")[0])
        low, high = next(b for b in BINS if b[0] <= size <= b[1])
        label = f"{low}-{high}" + ("+prompt" if key.endswith("+prompt") else "")
        acc = sums.setdefault(label, [0.0, 0.0])
        acc[0] += s["total"]
        acc[1] += s["n"]
    return {k: {"n": int(n), "mean_ms": round(1000 * t / n, 2)} for k, (t, n) in sums.items()}


def by_tokens(steps: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean execute ms and step count per bin of 16 tokens run (1-16, 17-32, ...)."""
    sums: dict[int, list[float]] = {}
    for key, s in steps.items():
        acc = sums.setdefault((int(key) - 1) // 16, [0.0, 0.0])
        acc[0] += s["total"]
        acc[1] += s["n"]
    return {f"{16 * b + 1}-{16 * b + 16}": {"n": int(n), "mean_ms": round(1000 * t / n, 2)}
            for b, (t, n) in sorted(sums.items())}  # fmt: skip
