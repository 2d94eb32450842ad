"""Multi-LoRA serving: PEFT adapters applied per token on top of one base model.

request.py   LoRARequest (vLLM's name, id, path) — pure Python, no torch
adapter.py   a PEFT folder -> validated, packed low-rank weights in host memory
layers.py    LoRALinear: wraps a model's projections, adds x·A·B for each token's slot
context.py   the step's token -> slot grouping, scoped to one forward
slots.py     `max_loras` device slots, LRU
manager.py   registered adapters, their in-flight users, the host (CPU) LRU cache
"""

from __future__ import annotations

from pinnace.runtime.lora.request import LoRARequest

__all__ = ["LoRARequest"]
