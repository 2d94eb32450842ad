"""`LLMDeployment.status`: the schema and the pure function that computes it.

Kubernetes conventions: `observedGeneration`, and conditions `Ready`, `Progressing`,
`Degraded` whose `lastTransitionTime` moves only when their status flips — so computing
the status twice from the same facts yields the same dict and reconcile writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Progressing", "Ready", "ScaledToZero", "Degraded"]
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
ConditionStatus = Literal["True", "False", "Unknown"]


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Condition(StatusModel):
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Effective(StatusModel):
    """What the operator resolved from the spec and runs (defaults applied)."""

    image: str
    model_path: str
    served_model_name: str
    args: list[str] = Field(default_factory=list)


AdapterState = Literal["Fetching", "Pending", "Loaded", "Failed"]


class AdapterStatus(StatusModel):
    """One declared LoRA adapter across the ready replicas (in KServe mode, as the ready
    predictor pods report it: they start with their adapters)."""

    name: str
    state: AdapterState = Field(
        description="Fetching: its fetch Job runs; Pending: not on every ready replica yet; "
        "Loaded: on every ready replica; Failed: see lastError."
    )
    loaded_replicas: int = Field(default=0, description="Ready replicas serving it.")
    last_error: str | None = None


class LLMDeploymentStatus(StatusModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    replicas: int | None = Field(
        default=None,
        description="Replicas of the runtime: pods, or groups of pods for a multi-node model.",
    )
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    selector: str | None = Field(default=None, description="Label selector (scale subresource).")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI API.")
    url: str | None = Field(default=None, description="The InferenceService's URL (KServe mode).")
    effective: Effective | None = None
    adapters: list[AdapterStatus] | None = Field(
        default=None, description="LoRA adapters, hot-loaded on the ready replicas."
    )


@dataclass(frozen=True)
class Observation:
    """What the child Deployment (or LeaderWorkerSet) reports, reduced to what status needs."""

    exists: bool = False
    desired: int | None = None  # spec.replicas as the Deployment has it (an HPA's choice)
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    up_to_date: bool = False  # the Deployment controller has seen its latest spec
    stuck_message: str | None = None  # ProgressDeadlineExceeded


def observe_deployment(deployment: Mapping[str, Any] | None) -> Observation:
    """A Deployment's counts of pods, or a LeaderWorkerSet's of groups (its status has the
    same fields: replicas, readyReplicas, updatedReplicas, observedGeneration)."""
    if deployment is None:
        return Observation()
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    stuck = next(
        (
            c.get("message") or "rollout exceeded its progress deadline"
            for c in status.get("conditions") or []
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        ),
        None,
    )
    replicas = (deployment.get("spec") or {}).get("replicas")
    return Observation(
        exists=True,
        desired=None if replicas is None else int(replicas),
        replicas=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        up_to_date=generation is None or status.get("observedGeneration", 0) >= generation,
        stuck_message=stuck,
    )


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the resource."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> None:
    """Upsert one condition; keep its lastTransitionTime unless the status flips."""
    value: ConditionStatus = status if isinstance(status, str) else "True" if status else "False"
    old = next((c for c in conditions if c["type"] == type_), None)
    since = old["lastTransitionTime"] if old and old["status"] == value else now
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    ).model_dump(by_alias=True, exclude_none=True)
    if old is None:
        conditions.append(new)
    else:
        conditions[conditions.index(old)] = new


def healthy_status(
    *,
    desired_replicas: int,
    obs: Observation,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
    endpoint: str,
    selector: str,
    effective: Effective,
    autoscaled: bool = False,
) -> dict[str, Any]:
    """Status of a valid resource whose children were applied (Deployment mode)."""
    conds = [dict(c) for c in (previous or {}).get("conditions") or []]

    def put(type_: str, status: bool, reason: str, message: str) -> None:
        set_condition(conds, type_, status, reason, message, now=now, generation=generation)

    ready = obs.ready >= desired_replicas > 0
    done = (
        obs.up_to_date
        and obs.updated >= desired_replicas
        and obs.ready >= desired_replicas
        and obs.replicas == desired_replicas
    )
    counts = f"{obs.ready}/{desired_replicas} replicas ready"
    if desired_replicas == 0:
        put("Ready", False, "ScaledToZero", "scaled to zero" if autoscaled else "replicas is 0")
    elif ready:
        msg = f"{counts}; serving at {endpoint}"
        put("Ready", True, "ReplicasReady", msg)
    else:
        msg = f"{counts} (pods pending or model loading)"
        put("Ready", False, "ReplicasNotReady", msg)
    if done:
        put("Progressing", False, "RolloutComplete", counts)
    else:
        msg = f"{obs.updated}/{desired_replicas} replicas updated, {obs.ready} ready"
        put("Progressing", True, "RollingOut", msg)
    if obs.stuck_message:
        put("Degraded", True, "RolloutStuck", obs.stuck_message)
    else:
        put("Degraded", False, "AsExpected", "")
    phase: Phase = (
        "Degraded" if obs.stuck_message
        else "ScaledToZero" if desired_replicas == 0
        else "Ready" if ready and done
        else "Pending" if obs.ready == 0
        else "Progressing"
    )  # fmt: skip
    return LLMDeploymentStatus(
        observed_generation=generation,
        phase=phase,
        conditions=[Condition.model_validate(c) for c in conds],
        replicas=obs.replicas,
        ready_replicas=obs.ready,
        updated_replicas=obs.updated,
        selector=selector,
        endpoint=endpoint,
        effective=effective,
    ).model_dump(by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class ServiceObservation:
    """What the child InferenceService reports (KServe mode)."""

    exists: bool = False
    ready: ConditionStatus | None = None  # its Ready condition; None: no status yet
    reason: str = ""
    message: str = ""
    url: str | None = None
    address: str | None = None  # in-cluster URL
    up_to_date: bool = False  # KServe has seen its latest spec


def observe_inference_service(isvc: Mapping[str, Any] | None) -> ServiceObservation:
    if isvc is None:
        return ServiceObservation()
    status = isvc.get("status") or {}
    generation = (isvc.get("metadata") or {}).get("generation")
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    value = ready.get("status") if ready else None
    return ServiceObservation(
        exists=True,
        ready=value if value in ("True", "False", "Unknown") else None,
        reason=(ready or {}).get("reason") or "",
        message=(ready or {}).get("message") or "",
        url=status.get("url") or None,
        address=(status.get("address") or {}).get("url") or None,
        up_to_date=generation is None or status.get("observedGeneration", 0) >= generation,
    )


def kserve_status(
    *,
    name: str,
    obs: ServiceObservation,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
    selector: str,
    effective: Effective,
) -> dict[str, Any]:
    """Status of a KServe-mode resource: Ready and the URL mirror the InferenceService's."""
    conds = [dict(c) for c in (previous or {}).get("conditions") or []]

    def put(type_: str, status: bool | ConditionStatus, reason: str, message: str) -> None:
        set_condition(conds, type_, status, reason, message, now=now, generation=generation)

    isvc = f"InferenceService {name}"
    if obs.ready is None:
        put("Ready", "Unknown", "AwaitingKServe", f"{isvc} has no Ready condition yet "
            "(is KServe installed?)")  # fmt: skip
    else:
        fallback = {"True": "InferenceServiceReady", "False": "InferenceServiceNotReady"}
        reason = obs.reason or fallback.get(obs.ready, "InferenceServiceUnknown")
        message = obs.message or (f"{isvc} is ready at {obs.url}" if obs.url else isvc)
        put("Ready", obs.ready, reason, message)
    done = obs.ready == "True" and obs.up_to_date
    if done:
        put("Progressing", False, "InferenceServiceReady", f"{isvc} is ready")
    else:
        put("Progressing", True, "WaitingForInferenceService", f"waiting for {isvc} to be ready")
    put("Degraded", False, "AsExpected", "")
    phase: Phase = (
        "Ready" if done else "Pending" if obs.ready in (None, "Unknown") else "Progressing"
    )
    base = obs.address or obs.url
    return LLMDeploymentStatus(
        observed_generation=generation,
        phase=phase,
        conditions=[Condition.model_validate(c) for c in conds],
        selector=selector,
        endpoint=f"{base.rstrip('/')}/v1" if base else None,
        url=obs.url,
        effective=effective,
    ).model_dump(by_alias=True, exclude_none=True)


def degraded_status(
    *,
    reason: str,
    message: str,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """Status of a resource the operator refuses to roll out; last known counts are kept."""
    status = dict(previous or {})
    conds = [dict(c) for c in status.get("conditions") or []]

    def put(type_: str, status: bool, message: str) -> None:
        set_condition(conds, type_, status, reason, message, now=now, generation=generation)

    put("Degraded", True, message)
    put("Progressing", False, "not rolled out until the spec is fixed")
    if not any(c["type"] == "Ready" for c in conds):
        put("Ready", False, message)
    status.update(observedGeneration=generation, phase="Degraded", conditions=conds)
    return LLMDeploymentStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True)


ADAPTERS_CONDITION = "AdaptersReady"


def with_adapters(
    status: Mapping[str, Any],
    adapters: list[AdapterStatus] | None,
    *,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """`status` plus `adapters` and the AdaptersReady condition; None (LoRA off) drops both."""
    out = dict(status)
    conds = [dict(c) for c in out.get("conditions") or []]
    if adapters is None:
        out["conditions"] = [c for c in conds if c["type"] != ADAPTERS_CONDITION]
        out.pop("adapters", None)
        return out
    out["conditions"] = conds
    by_state: dict[str, list[AdapterStatus]] = {}
    for adapter in adapters:
        by_state.setdefault(adapter.state, []).append(adapter)

    def listed(state: str) -> str:
        return ", ".join(a.name for a in by_state[state])

    if "Failed" in by_state:
        failed = by_state["Failed"]
        message = "; ".join(f"{a.name}: {a.last_error}" for a in failed)
        ok, reason = False, "AdapterFailed"
    elif "Fetching" in by_state:
        ok, reason, message = False, "Fetching", f"fetching {listed('Fetching')}"
    elif "Pending" in by_state:
        ok, reason = False, "Pending"
        message = f"not yet loaded on every ready replica: {listed('Pending')}"
    else:
        ok, reason = True, "Loaded"
        message = f"{len(adapters)} adapter(s) loaded on every ready replica"
    set_condition(conds, ADAPTERS_CONDITION, ok, reason, message, now=now, generation=generation)
    out["adapters"] = [a.model_dump(by_alias=True, exclude_none=True) for a in adapters]
    return out


DEPRECATED_CONDITION = "Deprecated"


def with_deprecations(
    status: Mapping[str, Any], messages: list[str], *, generation: int | None, now: str
) -> dict[str, Any]:
    """`status` plus a Deprecated condition naming what to change; none drops it."""
    out = dict(status)
    conds = [dict(c) for c in out.get("conditions") or []]
    if messages:
        message = "; ".join(messages)
        reason = "DeprecatedSpelling"
        set_condition(
            conds, DEPRECATED_CONDITION, True, reason, message, now=now, generation=generation
        )
    out["conditions"] = [c for c in conds if messages or c["type"] != DEPRECATED_CONDITION]
    return out


def adapter_events(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """A Warning per adapter that starts failing (or fails differently)."""
    old = {a["name"]: a for a in (previous or {}).get("adapters") or []}
    events = []
    for adapter in new.get("adapters") or []:
        before = old.get(adapter["name"], {})
        if adapter["state"] == "Failed" and (
            before.get("state") != "Failed" or before.get("lastError") != adapter.get("lastError")
        ):
            message = f"adapter {adapter['name']}: {adapter.get('lastError', '')}"
            events.append(Event("Warning", "AdapterFailed", message))
    return events


def transition_events(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """Events for condition flips worth a human's attention."""

    def state(status: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
        conds = (status or {}).get("conditions") or []
        return {c["type"]: (c["status"], c.get("reason", "")) for c in conds}

    old, cur = state(previous), state(new)
    by_type = {c["type"]: c for c in new.get("conditions") or []}
    events = []
    if cur.get("Ready", ("",))[0] == "True" and old.get("Ready", ("",))[0] != "True":
        events.append(Event("Normal", "Ready", by_type["Ready"]["message"]))
    if old.get("Ready", ("",))[0] == "True" and cur.get("Ready", ("",))[0] != "True":
        if cur["Ready"][1] == "ScaledToZero":  # asked for (replicas 0, or idle autoscaling)
            events.append(Event("Normal", "ScaledToZero", by_type["Ready"]["message"]))
        else:
            events.append(Event("Warning", "NotReady", by_type["Ready"]["message"]))
    if cur.get("Degraded", ("",))[0] == "True" and old.get("Degraded") != cur["Degraded"]:
        events.append(Event("Warning", cur["Degraded"][1], by_type["Degraded"]["message"]))
    if old.get("Degraded", ("",))[0] == "True" and cur.get("Degraded", ("",))[0] != "True":
        events.append(Event("Normal", "Recovered", "the resource is valid again"))
    # Once per new deprecation message, not on every pass.
    was_deprecated = [
        c for c in (previous or {}).get("conditions") or [] if c["type"] == DEPRECATED_CONDITION
    ]
    deprecated = by_type.get(DEPRECATED_CONDITION)
    if deprecated and [deprecated["message"]] != [c.get("message") for c in was_deprecated]:
        events.append(Event("Warning", "Deprecated", deprecated["message"]))
    adapters = cur.get(ADAPTERS_CONDITION, ("",))
    if adapters[0] == "True" and old.get(ADAPTERS_CONDITION, ("",))[0] != "True":
        events.append(Event("Normal", "AdaptersLoaded", by_type[ADAPTERS_CONDITION]["message"]))
    return events + adapter_events(previous, new)
