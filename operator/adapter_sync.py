"""Hot-loading: every ready runtime pod serves exactly the declared LoRA adapters.

A pass lists the resource's pods, asks each ready one what it has loaded (`GET
/v1/models`) and loads or unloads the difference. Pods keep no record of their own: one
that restarted comes back with no adapters, and the first pass that sees it ready again
catches it up. Passes run inside reconcile, which runs on resource changes, on events of
the runtime pods (ready, restarted, gone) and of the fetch Jobs, and on kopf's periodic
re-list of its watches (`handlers.py`).

A failed load is not retried on every pass: each (pod, adapter, path) waits out a
backoff (10 s, doubling to 5 min) while its error stays in status, so a bad adapter costs
one call per pod per window, never a storm, and a fix (a new path) is tried at once.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import posixpath
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pinnace.operator import names
from pinnace.operator.client import KubeClient
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render.adapters import adapter_sources, fetch_state
from pinnace.operator.render.labels import selector_string
from pinnace.operator.runtime_client import PodEndpoint, RuntimeCallError, RuntimeClient, pod_url
from pinnace.operator.status import AdapterState, AdapterStatus

BACKOFF_START_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0
MAX_PARALLEL_PODS = 8


@dataclass(frozen=True)
class PodPlan:
    unload: tuple[str, ...]
    load: tuple[tuple[str, str], ...]  # (name, path)


def plan_pod(desired: Mapping[str, str | None], loaded: Mapping[str, str | None]) -> PodPlan:
    """What to change on one pod. `desired[name] is None`: declared, but its files are not
    in place yet (fetching), so whatever the pod has under that name is left alone.
    An adapter loaded from another path than the declared one is reloaded."""
    stale = {
        name
        for name, root in loaded.items()
        if (path := desired.get(name)) is not None
        and root is not None
        and posixpath.normpath(root) != posixpath.normpath(path)
    }
    unload = sorted(name for name in loaded if name not in desired or name in stale)
    load = sorted(
        (name, path)
        for name, path in desired.items()
        if path is not None and (name not in loaded or name in stale)
    )
    return PodPlan(tuple(unload), tuple(load))


@dataclass
class PodOutcome:
    """One pod after a pass: what it has loaded, and what went wrong."""

    pod: str
    loaded: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)  # adapter -> message
    unreachable: str | None = None  # GET /v1/models failed: nothing is known


@dataclass(frozen=True)
class Failure:
    message: str
    attempts: int
    retry_at: float


FailureKey = tuple[str, str, str, str, str]  # namespace, resource, pod uid, adapter, path


class FailureLog:
    """Failed loads and when each may be tried again (thread-safe, per operator process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[FailureKey, Failure] = {}
        self._lock = threading.Lock()

    def blocked(self, key: FailureKey) -> Failure | None:
        """The failure to report instead of calling again, while its backoff runs."""
        with self._lock:
            failure = self._failures.get(key)
        return failure if failure is not None and self._clock() < failure.retry_at else None

    def record(self, key: FailureKey, message: str) -> None:
        with self._lock:
            attempts = self._failures[key].attempts + 1 if key in self._failures else 1
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_START_SECONDS * 2 ** (attempts - 1))
            self._failures[key] = Failure(message, attempts, self._clock() + delay)

    def clear(self, key: FailureKey) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def forget_gone_pods(self, namespace: str, resource: str, pod_uids: set[str]) -> None:
        with self._lock:
            for key in [k for k in self._failures if k[:2] == (namespace, resource)]:
                if key[2] not in pod_uids:
                    del self._failures[key]


class AdapterSync:
    """Brings pods in line with the declared adapters through a `RuntimeClient`."""

    def __init__(self, runtime: RuntimeClient, failures: FailureLog | None = None) -> None:
        self.runtime = runtime
        self.failures = failures or FailureLog()

    def sync_pods(
        self,
        scope: tuple[str, str],
        pods: Sequence[PodEndpoint],
        desired: Mapping[str, str | None],
        api_key: str | None,
    ) -> list[PodOutcome]:
        """One pass over `pods` (in parallel); outcomes in the order of `pods`."""
        self.failures.forget_gone_pods(*scope, {p.uid for p in pods})
        if not pods:
            return []
        workers = min(MAX_PARALLEL_PODS, len(pods))
        with ThreadPoolExecutor(workers, thread_name_prefix="adapter-sync") as pool:
            return list(pool.map(lambda p: self._sync_pod(scope, p, desired, api_key), pods))

    def _sync_pod(
        self,
        scope: tuple[str, str],
        pod: PodEndpoint,
        desired: Mapping[str, str | None],
        api_key: str | None,
    ) -> PodOutcome:
        outcome = PodOutcome(pod.name)
        try:
            loaded = self.runtime.list_adapters(pod, api_key)
        except RuntimeCallError as err:
            outcome.unreachable = str(err)
            return outcome
        outcome.loaded = set(loaded)
        plan = plan_pod(desired, loaded)
        for name in plan.unload:
            try:
                self.runtime.unload_adapter(pod, api_key, name)
                outcome.loaded.discard(name)
            except RuntimeCallError as err:
                outcome.errors[name] = str(err)
        for name, path in plan.load:
            if name in outcome.loaded:
                continue  # a stale copy whose unload failed (reported above)
            key = (*scope, pod.uid, name, path)
            failure = self.failures.blocked(key)
            if failure is not None:
                outcome.errors[name] = failure.message
                continue
            try:
                self.runtime.load_adapter(pod, api_key, name, path)
            except RuntimeCallError as err:
                self.failures.record(key, str(err))
                outcome.errors[name] = str(err)
                continue
            self.failures.clear(key)
            outcome.loaded.add(name)
        return outcome


def sync_adapters(
    client: KubeClient,
    syncer: AdapterSync,
    llmd: LLMDeployment,
    live: Mapping[str, Mapping[str, Any]],
) -> list[AdapterStatus]:
    """One hot-load pass for a Deployment-mode resource; the per-adapter status.

    `live` maps "Kind/name" to the children reconcile just applied (the fetch Jobs).
    """
    sources = adapter_sources(llmd)
    desired: dict[str, str | None] = {}
    fetch_errors: dict[str, str] = {}
    fetching: set[str] = set()
    for source in sources:
        done, error = (True, None)
        if source.fetch_job is not None:
            done, error = fetch_state(live.get(f"Job/{source.fetch_job}"))
        desired[source.name] = source.path if done else None
        if error is not None:
            fetch_errors[source.name] = error
        elif not done:
            fetching.add(source.name)
    listed = client.list_objects("Pod", llmd.namespace, selector_string(llmd))
    pods = ready_pods(listed)
    api_key, key_error = _api_key(client, llmd) if pods else (None, None)
    if key_error is not None:
        outcomes = [PodOutcome(p.name, unreachable=key_error) for p in pods]
    else:
        outcomes = syncer.sync_pods((llmd.namespace, llmd.name), pods, desired, api_key)
    for pod_name, condition in gate_changes(listed, outcomes, desired):
        client.patch_pod_condition(llmd.namespace, pod_name, condition)
    return [
        _adapter_status(s.name, outcomes, fetch_errors.get(s.name), s.name in fetching)
        for s in sources
    ]


def gate_changes(
    pods: Sequence[Mapping[str, Any]],
    outcomes: Sequence[PodOutcome],
    desired: Mapping[str, str | None],
) -> list[tuple[str, dict[str, Any]]]:
    """The adapter readiness gate conditions to write: (pod name, condition).

    True once a pod's runtime has every declared adapter whose files are in place (one
    still being fetched does not hold pods back); granted per runtime start, so a runtime
    that restarts (empty) is un-Ready until a pass has loaded them again. An adapter added
    later never takes a serving pod out: its status shows it Pending instead.
    """
    done = {
        o.pod
        for o in outcomes
        if o.unreachable is None and all(n in o.loaded for n, p in desired.items() if p)
    }
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    changes = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        gates = [g.get("conditionType") for g in spec.get("readinessGates") or []]
        if names.ADAPTERS_GATE not in gates or meta.get("deletionTimestamp"):
            continue
        state = _named(status.get("containerStatuses"), names.CONTAINER_NAME) or {}
        loaded_message = f"declared adapters loaded (runtime start {state.get('restartCount', 0)})"
        old = _named_condition(status.get("conditions"), names.ADAPTERS_GATE)
        if meta["name"] in done:
            want = ("True", "AdaptersLoaded", loaded_message)
        elif old.get("status") == "True" and old.get("message") != loaded_message:
            want = ("False", "RuntimeRestarted", "the runtime restarted; reloading adapters")
        else:
            continue
        if (old.get("status"), old.get("reason"), old.get("message")) != want:
            status_, reason, message = want
            condition = {"type": names.ADAPTERS_GATE, "status": status_, "reason": reason}
            condition.update(message=message, lastTransitionTime=now)
            changes.append((str(meta["name"]), condition))
    return changes


def _named_condition(conditions: Any, type_: str) -> dict[str, Any]:
    return next((dict(c) for c in conditions or [] if c.get("type") == type_), {})


def _adapter_status(
    name: str, outcomes: Sequence[PodOutcome], fetch_error: str | None, fetching: bool
) -> AdapterStatus:
    state: AdapterState
    error: str | None
    loaded = sum(1 for o in outcomes if name in o.loaded)
    load_errors = [f"pod {o.pod}: {o.errors[name]}" for o in outcomes if name in o.errors]
    unreachable = [f"pod {o.pod}: {o.unreachable}" for o in outcomes if o.unreachable]
    if fetch_error is not None:
        state, error = "Failed", fetch_error
    elif fetching:
        state, error = "Fetching", None
    elif load_errors:
        state, error = "Failed", load_errors[0]
    elif outcomes and loaded == len(outcomes):
        state, error = "Loaded", None
    else:  # no ready pod yet, or one that did not answer
        state, error = "Pending", (unreachable[0] if unreachable else None)
    return AdapterStatus(name=name, state=state, loaded_replicas=loaded, last_error=error)


def observe_kserve_adapters(
    client: KubeClient, syncer: AdapterSync, llmd: LLMDeployment
) -> list[AdapterStatus]:
    """KServe mode: pods start with the adapters (`--lora-modules`), nothing is hot-loaded;
    each ready predictor pod is asked what it serves (`GET /v1/models`), read only."""
    selector = f"{names.LABEL_KSERVE_ISVC}={llmd.name}"
    listed = client.list_objects("Pod", llmd.namespace, selector)
    pods = ready_pods(listed, names.KSERVE_CONTAINER_NAME, names.KSERVE_PORT_NAME)
    api_key, key_error = _api_key(client, llmd) if pods else (None, None)
    outcomes = []
    for pod in pods:
        outcome = PodOutcome(pod.name)
        try:
            if key_error is not None:
                raise RuntimeCallError(key_error)
            outcome.loaded = set(syncer.runtime.list_adapters(pod, api_key))
        except RuntimeCallError as err:
            outcome.unreachable = str(err)
        outcomes.append(outcome)
    return [_adapter_status(a.name, outcomes, None, False) for a in llmd.spec.adapters]


def ready_pods(
    pods: Sequence[Mapping[str, Any]],
    container_name: str = names.CONTAINER_NAME,
    port_name: str = names.PORT_NAME,
) -> list[PodEndpoint]:
    """Running pods whose runtime container is ready and was started with LoRA enabled."""
    out = []
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        container = _named(spec.get("containers"), container_name)
        state = _named(status.get("containerStatuses"), container_name)
        if not (container and state and state.get("ready") and status.get("podIP")):
            continue
        if "--enable-lora" not in (container.get("args") or []):
            continue  # a pod of a template without LoRA, on its way out
        port = next(
            (
                p["containerPort"]
                for p in container.get("ports") or []
                if p.get("name") == port_name
            ),
            None,
        )
        if port is not None:
            url = pod_url(status["podIP"], int(port))
            out.append(PodEndpoint(meta["name"], meta.get("uid", meta["name"]), url))
    return out


def _named(items: Any, name: str) -> dict[str, Any] | None:
    return next((dict(i) for i in items or [] if i.get("name") == name), None)


def _api_key(client: KubeClient, llmd: LLMDeployment) -> tuple[str | None, str | None]:
    """The key the pods require (serving.apiKeySecretRef), or why it cannot be read."""
    ref = llmd.spec.serving.api_key_secret_ref
    if ref is None:
        return None, None
    secret = client.get("Secret", llmd.namespace, ref.name)
    where = f"API key Secret {llmd.namespace}/{ref.name}"
    if secret is None:
        return None, f"{where} not found"
    value = (secret.get("data") or {}).get(ref.key)
    if value is None:
        return None, f"{where} has no key {ref.key!r}"
    try:
        return base64.b64decode(value, validate=True).decode(), None
    except (binascii.Error, UnicodeDecodeError):
        return None, f"{where}: key {ref.key!r} is not base64-encoded UTF-8"
