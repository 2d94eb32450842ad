"""What the front end and the engine core say to each other, and how it crosses a socket.

    front end ──(AddRequests | AbortRequests | UtilityCall | Shutdown)──> core
    front end <──(CoreReady | StepOutputs | UtilityResult | RequestsFailed | CoreDead)── core

One `StepOutputs` per engine step carries every request's new tokens (a list per request,
so steps that accept several tokens need no other message) and the scheduler's counters,
which the front end's /metrics reports. Messages are msgpack (msgspec) structs encoded as
arrays; token ids travel as integer arrays. Only what is sent once per request or per
control call (sampling parameters, an adapter, an embedding batch) is pickled.
"""

from __future__ import annotations

import dataclasses
import pickle
import typing
from typing import Any

import msgspec

from pinnace.runtime.core.outputs import RequestUpdate, SchedulerStats
from pinnace.runtime.engine.engine_core import CoreRequest

# -- front end -> core -----------------------------------------------------------------------


class WireRequest(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    req_id: str
    prompt_token_ids: list[int]
    params: bytes  # a pickled SamplingParams (once per request)
    max_tokens: int
    arrival_time: float
    cache_salt: str | None = None
    lora_request: bytes | None = None  # a pickled LoRARequest


class AddRequests(msgspec.Struct, array_like=True, tag=True):
    requests: list[WireRequest]


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    req_ids: list[str]
    stopped: bool = False  # a stop string ended them (not a client going away)


class UtilityCall(msgspec.Struct, array_like=True, tag=True):
    """Run a core method between two steps (add_lora, embed, ...)."""

    call_id: int
    method: str
    args: bytes  # pickled tuple


class Shutdown(msgspec.Struct, array_like=True, tag=True):
    pass


Command = AddRequests | AbortRequests | UtilityCall | Shutdown

# -- core -> front end -----------------------------------------------------------------------


def _array_struct(name: str, cls: type) -> type[msgspec.Struct]:
    """A msgpack array twin of dataclass `cls` (same fields, trailing defaults left out):
    a request's update is a few bytes, not a map of field names; and a field added to the
    dataclass travels without a change here."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            fields.append((f.name, hints[f.name], f.default))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, hints[f.name], msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, hints[f.name], msgspec.NODEFAULT))
    return msgspec.defstruct(name, fields, array_like=True, omit_defaults=True)


WireUpdate = _array_struct("WireUpdate", RequestUpdate)
_UPDATE_FIELDS = [f.name for f in dataclasses.fields(RequestUpdate)]


def updates_to_wire(updates: list[RequestUpdate]) -> list[Any]:
    return [WireUpdate(**{n: getattr(u, n) for n in _UPDATE_FIELDS}) for u in updates]


def updates_from_wire(wires: list[Any]) -> list[RequestUpdate]:
    return [RequestUpdate(**{n: getattr(w, n) for n in _UPDATE_FIELDS}) for w in wires]


class CoreReady(msgspec.Struct, array_like=True, tag=True):
    """The core loaded the model: what the front end needs that only loading tells."""

    max_model_len: int
    num_kv_blocks: int
    runner_type: str  # "generate" or "pooling", as the core resolved it
    # Pickled (tokenizer, model config, EOS ids): the front end needs them, and opening a
    # checkpoint again can be slow (a GGUF's tokenizer is converted: ~15 s for SmolLM2).
    model_facts: bytes


class StepOutputs(msgspec.Struct, array_like=True, tag=True):
    # RequestUpdate in a thread; WireUpdate (its array twin) across processes.
    updates: list[WireUpdate]  # type: ignore[valid-type]
    stats: SchedulerStats
    step_start: float  # time.monotonic() in the core (the same clock across processes)
    # Scheduler ids that left the waiting queue in this step (first scheduled).
    scheduled_ids: list[str] = []
    num_applied_adds: int = 0  # scheduler requests the core has taken in so far
    # The step itself failed: these requests were aborted in the core.
    failed_ids: list[str] = []
    error: str | None = None


class UtilityResult(msgspec.Struct, array_like=True, tag=True):
    call_id: int
    result: bytes  # pickled value, or the pickled exception when `failed`
    failed: bool = False


class RequestsFailed(msgspec.Struct, array_like=True, tag=True):
    """Requests the core refused when adding them (an adapter gone, ...)."""

    req_ids: list[str]
    error: bytes  # a pickled exception (ValueError, FileNotFoundError)
    num_applied_adds: int = 0


class CoreDead(msgspec.Struct, array_like=True, tag=True):
    reason: str
    # Set when the core could not start for a reason the user can fix (a bad flag, a
    # missing draft model): "ValueError" or "FileNotFoundError", and `reason` is the
    # message alone. The front end raises it as such (pinnace serve: one line, exit 2).
    user_error: str | None = None


Event = CoreReady | StepOutputs | UtilityResult | RequestsFailed | CoreDead


def to_wire(request: CoreRequest) -> WireRequest:
    lora = None if request.lora_request is None else pickle.dumps(request.lora_request)
    return WireRequest(
        request.req_id,
        request.prompt_token_ids,
        pickle.dumps(request.params),
        request.max_tokens,
        request.arrival_time,
        request.cache_salt,
        lora,
    )


def from_wire(wire: WireRequest) -> CoreRequest:
    lora = None if wire.lora_request is None else pickle.loads(wire.lora_request)
    return CoreRequest(
        wire.req_id,
        wire.prompt_token_ids,
        pickle.loads(wire.params),
        wire.max_tokens,
        wire.cache_salt,
        lora,
        wire.arrival_time,
    )


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


class Codec:
    """msgpack encoders/decoders for one side of the connection (reused: no per-message
    setup)."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.commands = msgspec.msgpack.Decoder(Command)
        self.events = msgspec.msgpack.Decoder(Event)

    def encode(self, message: Command | Event) -> bytes:
        return self.encoder.encode(message)
