"""`max_loras` device slots shared by every LoRALinear; the least recently used one goes.

A slot holds one adapter in every wrapped layer at once (layers it does not target get
k = 0). The scheduler never puts more distinct adapters in a step than there are slots,
so the adapters of the current step can always be resident together.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from pinnace.runtime.lora.adapter import LoRAAdapter
from pinnace.runtime.lora.layers import LoRALinear


class LoRASlots:
    def __init__(self, layers: dict[tuple[int, str], LoRALinear], max_loras: int) -> None:
        self.layers = layers
        self.max_loras = max_loras
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter key -> slot, LRU first
        self.num_loads = 0  # adapters copied into a slot (the first time or after eviction)
        self.num_evictions = 0  # adapters pushed out of a slot to make room

    @property
    def resident(self) -> list[int]:
        """Adapter keys in a slot, least recently used first."""
        return list(self._slot_of)

    def slot_of(self, key: int) -> int | None:
        return self._slot_of.get(key)

    def activate(self, keys: Iterable[int], fetch: Callable[[int], LoRAAdapter]) -> dict[int, int]:
        """Make every adapter in `keys` resident; returns key -> slot.

        `fetch(key)` gives an adapter's host copy when it must be copied in.
        """
        wanted = sorted(set(keys))
        if len(wanted) > self.max_loras:
            raise RuntimeError(
                f"a step uses {len(wanted)} adapters but there are {self.max_loras} slots "
                "(the scheduler must keep steps within max_loras)"
            )
        for key in wanted:
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
        for key in wanted:
            if key not in self._slot_of:
                slot = self._take_slot(keep=set(wanted))
                self._load(slot, fetch(key))
                self._slot_of[key] = slot
        return {key: self._slot_of[key] for key in wanted}

    def evict(self, key: int) -> None:
        """Forget an adapter (removed from the engine); its slot becomes free."""
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot, None)

    def _take_slot(self, keep: set[int]) -> int:
        used = set(self._slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        victim = next(key for key in self._slot_of if key not in keep)
        self.num_evictions += 1
        return self._slot_of.pop(victim)

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer in self.layers.items():
            layer.set_slot(slot, adapter.weights.get(name))
        self.num_loads += 1
