"""LoRAManager: the adapters an engine serves, from folder to host memory to device slot.

    register (add / lazily by a request) -> host copy (LRU, max_cpu_loras)
        -> device slot when a step needs it (LRU, max_loras; slots.py)

Each registration gets a fresh *key*, never reused. Requests carry the key
(Request.lora_id), so it is also what keys the prefix cache: an adapter loaded again
under an old id or name can never hit the KV blocks of the one before.

Removing an adapter takes effect for new requests at once; requests already running
with it keep it until the last of them finishes. A host copy evicted by the LRU is read
from its folder again when needed.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

import torch
from torch import nn

from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.lora.adapter import LoRAAdapter, load_adapter
from pinnace.runtime.lora.context import LoRABatch
from pinnace.runtime.lora.layers import LoRASlotsConfig, installed_lora_layers
from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.lora.slots import LoRASlots
from pinnace.runtime.lora.targets import model_spec

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        slots: LoRASlotsConfig,
        max_cpu_loras: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Serve adapters on a model built with LoRA layers (models.loader.build_model)."""
        self.spec = model_spec(model)
        self.max_lora_rank = slots.max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.device = device
        layers = installed_lora_layers(model)
        if not layers:
            raise ValueError("the model was built without LoRA layers (enable_lora=False).")
        self.slots = LoRASlots(layers, slots.max_loras)
        self._next_key = itertools.count(1)
        self._key_of_id: dict[int, int] = {}  # lora_int_id -> key, registered adapters only
        self._requests: dict[int, LoRARequest] = {}  # key -> its request (incl. retired)
        self._users: dict[int, int] = {}  # key -> unfinished requests using it
        self._retired: set[int] = set()  # removed while in use
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU first
        self.num_disk_loads = 0  # folder reads after registration (host copy was evicted)

    # -- registration (engine thread) -----------------------------------------------------

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """Read and validate an adapter folder; thread-safe (touches no engine state)."""
        return load_adapter(request, self.spec, self.max_lora_rank, self.dtype)

    def add(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Register an adapter (reading it unless `adapter` is its `load`); False if its
        id is registered already with the same name and path."""
        key = self._key_of_id.get(request.lora_int_id)
        if key is not None:
            known = self._requests[key]
            if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(
                    f"lora_int_id {request.lora_int_id} is already used by adapter "
                    f"{known.lora_name!r} ({known.lora_path}); give {request.lora_name!r} "
                    "another id."
                )
            return False
        adapter = adapter if adapter is not None else self.load(request)
        key = next(self._next_key)
        self._key_of_id[request.lora_int_id] = key
        self._requests[key] = request
        self._users[key] = 0
        self._keep_on_host(key, adapter)
        logger.info(
            "LoRA adapter %r (id %d, rank %d, %.1f MiB) loaded from %s",
            request.lora_name, request.lora_int_id, adapter.rank, adapter.num_bytes / 2**20,
            request.lora_path,
        )  # fmt: skip
        return True

    def remove(self, lora_int_id: int) -> bool:
        """Unregister an adapter; False if the id is not registered."""
        key = self._key_of_id.pop(lora_int_id, None)
        if key is None:
            return False
        if self._users[key]:
            self._retired.add(key)
        else:
            self._drop(key)
        return True

    def list_loras(self) -> list[LoRARequest]:
        return [self._requests[key] for key in self._key_of_id.values()]

    @property
    def num_held(self) -> int:
        """Adapters held: registered ones, and removed ones that requests still use."""
        return len(self._requests)

    # -- requests (engine thread) ----------------------------------------------------------

    def acquire(self, request: LoRARequest) -> int:
        """A request starts using an adapter (registered now if new); returns its key."""
        self.add(request)
        key = self._key_of_id[request.lora_int_id]
        self._users[key] += 1
        return key

    def release(self, key: int) -> None:
        """A request using the adapter `key` finished or was aborted."""
        self._users[key] -= 1
        if self._users[key] == 0 and key in self._retired:
            self._drop(key)

    def _drop(self, key: int) -> None:
        self._retired.discard(key)
        del self._requests[key], self._users[key]
        self._host.pop(key, None)
        self.slots.evict(key)

    # -- the step (engine thread) ----------------------------------------------------------

    def prepare(
        self, scheduled: list[ScheduledRequest]
    ) -> tuple[list[ScheduledRequest], LoRABatch | None]:
        """Make the step's adapters resident. Returns the requests ordered by slot (base
        model first; stable, so FCFS within a slot) and each slot's rows in that order."""
        keys = {item.lora_id for item in scheduled if item.lora_id}
        if not keys:
            return scheduled, None
        slot_of = self.slots.activate(keys, self._host_copy)

        def slot(item: ScheduledRequest) -> int:
            return slot_of.get(item.lora_id, -1)

        ordered = sorted(scheduled, key=slot)
        segments = []
        start = 0
        for s, group in itertools.groupby(ordered, key=slot):
            end = start + sum(item.num_scheduled_tokens for item in group)
            if s >= 0:
                segments.append((s, start, end))
            start = end
        return ordered, LoRABatch(segments)

    def _host_copy(self, key: int) -> LoRAAdapter:
        adapter = self._host.get(key)
        if adapter is None:
            adapter = self.load(self._requests[key])
            self.num_disk_loads += 1
        self._keep_on_host(key, adapter)
        return adapter

    def _keep_on_host(self, key: int, adapter: LoRAAdapter) -> None:
        self._host[key] = adapter
        self._host.move_to_end(key)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
