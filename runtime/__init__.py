"""Pinnace runtime: a paged-KV, continuously batching LLM inference engine.

from pinnace.runtime import LLM, SamplingParams
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.outputs import CompletionOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pinnace.runtime.llm import LLM

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    # LLM is imported on first use (PEP 562): importing any pinnace.runtime submodule runs
    # this file, and the scheduling core (pinnace.runtime.core) must stay free of torch.
    if name == "LLM":
        from pinnace.runtime.llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
