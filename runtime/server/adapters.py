"""The LoRA adapters a server serves by name, and loading / unloading them at run time.

Mirrors vLLM's OpenAIServingModels: each loaded adapter gets a fresh integer id, names
are unique, and the messages and status codes of load / unload are vLLM's, so clients
written for vLLM (and the Pinnace operator) read them alike.
"""

from __future__ import annotations

import asyncio
import itertools

from pinnace.runtime.engine.async_engine import AsyncLLMEngine
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.server.errors import APIError

# vLLM's error `type` for a malformed or conflicting load / unload request.
INVALID_USER_INPUT = "InvalidUserInput"


class ServedAdapters:
    def __init__(self, engine: AsyncLLMEngine, base_names: list[str], enabled: bool) -> None:
        self.engine = engine
        self.base_names = base_names
        self.enabled = enabled
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one load / unload at a time: name checks stay true

    def get(self, name: str) -> LoRARequest | None:
        return self.by_name.get(name)

    def add_at_startup(self, name: str, path: str) -> None:
        """`--lora-modules`: register before the engine thread runs (errors end start-up)."""
        if name in self.base_names or name in self.by_name:
            raise ValueError(f"--lora-modules: the name {name!r} is taken.")
        request = LoRARequest(name, next(self._ids), path)
        self.engine.add_lora_at_startup(request)
        self.by_name[name] = request

    async def load(self, name: str, path: str, load_inplace: bool = False) -> str:
        """POST /v1/load_lora_adapter; returns vLLM's success text."""
        self._check_enabled()
        if not name or not path:
            raise APIError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", kind=INVALID_USER_INPUT
            )
        async with self._lock:
            old = self.by_name.get(name)
            if old is not None and not load_inplace:
                raise APIError(
                    400,
                    f"The lora adapter '{name}' has already been loaded.",
                    kind=INVALID_USER_INPUT,
                )
            self._check_name(name)
            request = LoRARequest(name, next(self._ids), path)
            try:
                await self.engine.add_lora(request)
            except FileNotFoundError as exc:
                raise APIError(404, f"Loading lora {name} failed: {exc}") from exc
            except ValueError as exc:
                raise APIError(400, f"Loading lora {name} failed: {exc}") from exc
            self.by_name[name] = request
            if old is not None:  # in place: requests running with the old one finish with it
                await self.engine.remove_lora(old.lora_int_id)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str) -> str:
        """POST /v1/unload_lora_adapter; returns vLLM's success text."""
        self._check_enabled()
        if not name:
            raise APIError(
                400,
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                kind=INVALID_USER_INPUT,
            )
        async with self._lock:
            request = self.by_name.pop(name, None)
            if request is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.")
            await self.engine.remove_lora(request.lora_int_id)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise APIError(
                400, "LoRA adapters need a server started with --enable-lora.", "lora_name"
            )

    def _check_name(self, name: str) -> None:
        if name in self.base_names:
            raise APIError(
                400,
                f"'{name}' is the name of the base model; give the adapter another name.",
                kind=INVALID_USER_INPUT,
            )
