"""One reconcile pass: parse -> render -> apply what changed -> observe -> hot-load
adapters -> status.

Pure planning lives in `render/` and `status.py`; this module only sequences them over a
`KubeClient` (and, for LoRA adapters, an `AdapterSync` that talks to the pods), so it runs
the same under kopf and in tests without kopf. A pass with nothing changed makes no write:
children are applied only when their applied-hash annotation or a field we own differs
(drift), and status only when it differs.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.utils import parse_quantity

from pinnace.operator import children, names
from pinnace.operator.adapter_sync import AdapterSync, observe_kserve_adapters, sync_adapters
from pinnace.operator.client import ApiError, KubeClient
from pinnace.operator.fit import check_fit
from pinnace.operator.llmdeployment import (
    LLMDeployment,
    SpecError,
    deprecations,
    parse_llmdeployment,
)
from pinnace.operator.render import PRUNABLE, endpoint, render_all
from pinnace.operator.render.adapters import fetch_job_selector
from pinnace.operator.render.args import model_source, serve_args
from pinnace.operator.render.labels import selector_string
from pinnace.operator.runtime_support import check_runtime_support
from pinnace.operator.status import (
    Effective,
    Event,
    degraded_status,
    healthy_status,
    kserve_status,
    observe_deployment,
    observe_inference_service,
    transition_events,
    with_adapters,
    with_deprecations,
)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ReconcileResult:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # "Kind/name" of children written/deleted
    error: SpecError | None = None  # set when the resource cannot be rolled out as is


def reconcile(
    client: KubeClient,
    body: Mapping[str, Any],
    *,
    now: Callable[[], str] = utc_now,
    adapters: AdapterSync | None = None,
) -> ReconcileResult:
    """Bring the children of one `LLMDeployment` body in line with its spec, and (given an
    `AdapterSync`) its runtime pods in line with its adapters.

    Raises `ApiError` for transient API failures (the caller retries with backoff).
    """
    meta = body["metadata"]
    namespace, name = meta.get("namespace", "default"), meta["name"]
    previous = dict(body.get("status") or {})
    try:
        llmd = parse_llmdeployment(body)
        check_fit(llmd)
        check_runtime_support(llmd)  # never roll out pods the runtime would refuse
        desired = render_all(llmd)
        events, applied, live = _apply_children(client, body, desired)
        events += _prune(client, body, {obj["kind"] for obj in desired}, applied)
        jobs = {o["metadata"]["name"] for o in desired if o["kind"] == "Job"}
        events += _prune_jobs(client, body, fetch_job_selector(llmd), jobs, applied)
    except SpecError as err:
        return _degraded(client, body, err, previous, now)
    except ApiError as err:
        if not err.is_permanent:
            raise
        rejected = SpecError(
            f"the API server rejected a child object: {err.message}", reason="ApplyRejected"
        )
        return _degraded(client, body, rejected, previous, now)
    status = _status(llmd, live, previous, meta.get("generation"), now())
    if adapters is not None:
        report = None
        if llmd.spec.serving.is_kserve and llmd.spec.adapters:
            report = observe_kserve_adapters(client, adapters, llmd)
        elif llmd.lora_enabled and not llmd.spec.serving.is_kserve:
            report = sync_adapters(client, adapters, llmd, live)
        status = with_adapters(status, report, generation=meta.get("generation"), now=now())
    status = with_deprecations(
        status, deprecations(llmd), generation=meta.get("generation"), now=now()
    )
    write_status(client, namespace, name, previous, status)
    return ReconcileResult(status, events + transition_events(previous, status), applied)


def _status(
    llmd: LLMDeployment,
    live: Mapping[str, dict[str, Any]],  # "Kind/name" -> the child as applied
    previous: Mapping[str, Any],
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    if llmd.spec.serving.is_kserve:
        return kserve_status(
            name=llmd.name,
            obs=observe_inference_service(live.get(f"InferenceService/{llmd.name}")),
            previous=previous,
            generation=generation,
            now=now,
            selector=f"{names.LABEL_KSERVE_ISVC}={llmd.name}",
            effective=effective(llmd),
        )
    workload = names.LWS_KIND if llmd.is_multi_node else "Deployment"
    obs = observe_deployment(live.get(f"{workload}/{llmd.name}"))
    desired = llmd.replicas
    if desired is None:  # autoscaled: the count is whatever the autoscaler set last
        desired = obs.desired if obs.desired is not None else 1
    return healthy_status(
        desired_replicas=desired,
        obs=obs,
        previous=previous,
        generation=generation,
        now=now,
        endpoint=endpoint(llmd),
        selector=selector_string(llmd),
        effective=effective(llmd),
        autoscaled=llmd.replicas is None,
    )


def effective(llmd: LLMDeployment) -> Effective:
    """What status reports the operator runs (defaults applied)."""
    return Effective(
        image=llmd.image,
        model_path=model_source(llmd).path,
        served_model_name=llmd.served_name,
        args=serve_args(llmd),
    )


def _degraded(
    client: KubeClient,
    body: Mapping[str, Any],
    err: SpecError,
    previous: dict[str, Any],
    now: Callable[[], str],
) -> ReconcileResult:
    meta = body["metadata"]
    status = degraded_status(
        reason=err.reason,
        message=str(err),
        previous=previous,
        generation=meta.get("generation"),
        now=now(),
    )
    write_status(client, meta.get("namespace", "default"), meta["name"], previous, status)
    return ReconcileResult(status, transition_events(previous, status), error=err)


def _apply_children(
    client: KubeClient, owner: Mapping[str, Any], desired: list[dict[str, Any]]
) -> tuple[list[Event], list[str], dict[str, dict[str, Any]]]:
    """Apply what differs; returns events, "Kind/name"s written, and the live children by
    "Kind/name"."""
    events, applied, live_by_name = [], [], {}
    for obj in desired:
        kind, meta = obj["kind"], obj["metadata"]
        live = client.get(kind, meta["namespace"], meta["name"])
        if live is None or not is_up_to_date(obj, live):
            # Ownership lets Kubernetes garbage-collect children with the resource. Only the
            # ownerReference: copying the owner's labels (kopf.adopt) would leak GitOps
            # tracking labels onto objects that are not in git.
            kopf.append_owner_reference(obj, owner=kopf.Body(dict(owner)))  # type: ignore[arg-type]
            verb = "Created" if live is None else "Updated"
            live = _apply(client, obj)
            applied.append(f"{kind}/{meta['name']}")
            events.append(Event("Normal", verb, f"{verb} {kind} {meta['name']}"))
        live_by_name[f"{kind}/{meta['name']}"] = live
    return events, applied, live_by_name


def _apply(client: KubeClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply; for a kind some add-on installs (`installed_by`: LeaderWorkerSet,
    KServe, KEDA), a 404 means the cluster does not serve its API: Degraded until someone
    installs it. A 404 for a built-in kind (Deployment, Service, ...) is something else,
    e.g. its namespace being deleted, and propagates as before."""
    try:
        return client.apply(obj)
    except ApiError as err:
        kind = children.BY_KIND.get(obj["kind"])
        if err.status != 404 or kind is None or not kind.installed_by:
            raise
        raise SpecError(
            f"the cluster does not serve {kind.kind} ({kind.api_version}): install "
            f"{kind.installed_by}; retried with backoff until then",
            reason="APINotInstalled",
            retryable=True,
        ) from None


def _prune(
    client: KubeClient, owner: Mapping[str, Any], desired_kinds: set[str], deleted: list[str]
) -> list[Event]:
    """Delete children this resource owns but no longer renders (mode or autoscaler change).

    Only objects whose ownerReference names this resource's uid: a same-named object
    someone else made is never touched.
    """
    meta, events = owner["metadata"], []
    namespace, name, uid = meta.get("namespace", "default"), meta["name"], meta.get("uid")
    for kind in PRUNABLE:
        if kind in desired_kinds or uid is None:
            continue
        live = client.get(kind, namespace, name)
        refs = (live or {}).get("metadata", {}).get("ownerReferences") or []
        if live is None or not any(ref.get("uid") == uid for ref in refs):
            continue
        client.delete(kind, namespace, name, live["metadata"]["uid"])
        deleted.append(f"{kind}/{name}")
        events.append(Event("Normal", "Deleted", f"Deleted {kind} {name}"))
    return events


def _prune_jobs(
    client: KubeClient,
    owner: Mapping[str, Any],
    selector: str,
    desired: set[str],
    deleted: list[str],
) -> list[Event]:
    """Delete fetch Jobs this resource owns that it no longer renders (adapter dropped, or
    its fetch changed and got a Job of a new name). The files stay: the cache is a cache."""
    meta, events = owner["metadata"], []
    uid = meta.get("uid")
    if uid is None:
        return []
    for job in client.list_objects("Job", meta.get("namespace", "default"), selector):
        job_meta = job["metadata"]
        owned = any(ref.get("uid") == uid for ref in job_meta.get("ownerReferences") or [])
        if owned and job_meta["name"] not in desired:
            client.delete("Job", job_meta["namespace"], job_meta["name"], job_meta["uid"])
            deleted.append(f"Job/{job_meta['name']}")
            events.append(Event("Normal", "Deleted", f"Deleted Job {job_meta['name']}"))
    return events


def is_up_to_date(desired: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    """Live carries our last applied hash and every field we set still has our value."""
    key = names.ANNOTATION_APPLIED_HASH
    want = desired["metadata"]["annotations"][key]
    have = (live.get("metadata") or {}).get("annotations", {}).get(key)
    return want == have and _contains(live, desired, quantities=False)


def _contains(live: Any, want: Any, *, quantities: bool) -> bool:
    """`want` is a sub-document of `live` (the server may add defaults, never change ours)."""
    if isinstance(want, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and _contains(live[k], v, quantities=k in ("requests", "limits"))
            for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(_contains(a, b, quantities=quantities) for a, b in zip(live, want, strict=True))
        )
    if quantities and isinstance(want, str) and isinstance(live, str) and want != live:
        # The API server canonicalises quantities ("0.5" -> "500m").
        try:
            return bool(parse_quantity(want) == parse_quantity(live))
        except ValueError:
            return False
    return bool(live == want)


def write_status(
    client: KubeClient,
    namespace: str,
    name: str,
    previous: Mapping[str, Any],
    status: Mapping[str, Any],
) -> bool:
    """The one place status is written; a no-op (no request) when nothing changed."""
    if dict(previous) == dict(status):
        return False
    client.patch_status(names.KIND, namespace, name, merge_patch(previous, status))
    return True


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 patch turning `old` into `new` (null deletes a key; lists are replaced)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(old.get(key), Mapping):
            sub = merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif old.get(key, object()) != value:
            patch[key] = value
    return patch
