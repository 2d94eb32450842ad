"""Pinnace runtime: a paged-KV, continuously batching LLM inference engine.

from pinnace.runtime import LLM, SamplingParams
"""

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.llm import LLM
from pinnace.runtime.outputs import CompletionOutput, RequestOutput
from pinnace.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "RequestOutput", "SamplingParams"]
