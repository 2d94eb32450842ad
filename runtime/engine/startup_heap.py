"""Keep the start-up heap out of the garbage collector's full collections (vLLM's
`freeze_gc_heap`).

A serving process holds about a million tracked objects once it has started (transformers,
the tokenizer, the routes, in the core the model's modules). Python's full (generation 2)
collection walks all of them: measured ~100 ms in the front end, twice in ten saturation
runs of issue #18's bench (48 streams x 64 tokens), each one a stall of every stream and
of the request intake. What exists at the end of start-up lives as long as the process,
so it is collected once and frozen: later full collections walk only what came after.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("pinnace.runtime")


def freeze_startup_heap(process: str) -> int:
    """Collect, then move every object left to the permanent generation; returns how many
    objects are frozen (in total: a second call adds what came since)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%s: %d start-up objects frozen out of garbage collection", process, frozen)
    return frozen
