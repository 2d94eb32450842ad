"""CoreLoop without a model: utility calls that read files stay off the step loop."""

from __future__ import annotations

import threading
from typing import Any

from pinnace.runtime.engine.core_loop import CoreLoop
from pinnace.runtime.engine.core_messages import Event, UtilityCall, UtilityResult, dumps, loads
from pinnace.runtime.lora.request import LoRARequest


class SlowLoRACore:
    """Just what add_lora needs; reading an adapter waits for `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.registered: list[tuple[LoRARequest, Any]] = []

    def has_unfinished_requests(self) -> bool:
        return False

    def load_lora(self, lora_request: LoRARequest) -> Any:
        if not self.release.wait(10):
            raise TimeoutError("never released")
        if lora_request.lora_path == "/missing":
            raise FileNotFoundError("no adapter at /missing")
        return f"adapter {lora_request.lora_name}"

    def add_lora(self, lora_request: LoRARequest, adapter: Any = None) -> bool:
        if adapter is None:  # as EngineCore: read the folder here, on the caller's thread
            adapter = self.load_lora(lora_request)
        self.registered.append((lora_request, adapter))
        return True


def test_add_lora_reads_the_adapter_off_the_step_loop() -> None:
    core = SlowLoRACore()
    events: list[Event] = []
    loop = CoreLoop(core, events.append)  # type: ignore[arg-type]
    good, missing = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/missing")
    handled = threading.Event()

    def handle() -> None:
        loop.handle(UtilityCall(7, "add_lora", dumps((good,))))
        loop.handle(UtilityCall(8, "add_lora", dumps((missing,))))
        handled.set()

    threading.Thread(target=handle, daemon=True).start()
    # The loop took both calls without waiting for the folder (it could step meanwhile).
    assert handled.wait(2), "the step loop waited for an adapter's folder"
    assert loop.has_work and not events
    loop.finish_background()
    assert not events and not core.registered  # still reading
    core.release.set()
    for _ in range(200):
        loop.finish_background()
        if len(events) == 2:
            break
        threading.Event().wait(0.01)
    results = {e.call_id: e for e in events if isinstance(e, UtilityResult)}
    assert not results[7].failed and loads(results[7].result) is True
    assert results[8].failed and isinstance(loads(results[8].result), FileNotFoundError)
    assert core.registered == [(good, "adapter a")]
    assert not loop.has_work
