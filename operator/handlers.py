"""Thin kopf handlers: every trigger funnels into one `reconcile` pass for one resource.

Triggers: create / update / resume of an `LLMDeployment`; events of the Deployments,
LeaderWorkerSets, Services, InferenceServices and adapter fetch Jobs it owns: status
follows pod (or KServe) readiness, and an edited or deleted child is put back (drift);
and events of its runtime pods when they serve LoRA adapters: a pod that turns ready,
restarts or goes away is what changes which adapters are loaded where, so that is when
the adapters are re-applied.
No timer or daemon: kopf would need a finalizer on every resource to stop them, and a
finalizer makes deletion hang whenever the operator is down. The periodic resync is the
watches' re-list every 5 minutes, which replays an event for every pod and child.

Error mapping: an invalid spec is a `PermanentError` (status says Degraded; kopf stops
retrying until the spec changes); API failures are `TemporaryError`s retried with
exponential backoff (`RetryPolicy`, 1 s doubling to 60 s unless the memo carries another),
and so is a child whose API the cluster does not serve (a CRD not installed yet: status
says Degraded, reason APINotInstalled, until it is).

Each pass logs "reconcile started" and "reconcile finished" at debug level, with the
resource as `llmdeployment="namespace/name"` on the record: what the operator did in
between is everything that pass did (tests wait on these instead of on silence).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from pinnace.operator import children, names
from pinnace.operator.adapter_sync import AdapterSync
from pinnace.operator.client import ApiError, HttpKubeClient, KubeClient
from pinnace.operator.reconcile import reconcile
from pinnace.operator.runtime_client import HttpRuntimeClient

logger = logging.getLogger(__name__)

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)
MANAGED_BY = {names.LABEL_MANAGED_BY: names.FIELD_MANAGER}
RUNTIME_POD = {**MANAGED_BY, names.LABEL_COMPONENT: names.COMPONENT}


def configure(settings: kopf.OperatorSettings) -> None:
    # kopf's own bookkeeping goes to annotations under our prefix; status stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{names.GROUP}/finalizer"
    # Only our explicit kopf.event() calls and real problems become Kubernetes Events,
    # not every "handler succeeded" log line.
    settings.posting.level = logging.WARNING
    # Re-establish watches every 5 minutes: a silently dead connection would stall the
    # operator, and each re-list replays the children's events — a periodic resync.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def build_registry(*, login: bool = True) -> kopf.OperatorRegistry:
    """All handlers, on a registry of their own (no import-time global state).

    `login=False` leaves authentication to a login handler the caller adds (tests).
    """
    registry = kopf.OperatorRegistry()

    if login:
        # A fresh registry lacks kopf's default login handlers: in-cluster or kubeconfig.
        @kopf.on.login(registry=registry)
        def authenticate(**kwargs: Any) -> kopf.ConnectionInfo | None:
            return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings)
        if getattr(memo, "client", None) is None:
            memo.client = HttpKubeClient.from_environment()
        if getattr(memo, "adapters", None) is None:
            memo.adapters = AdapterSync(HttpRuntimeClient())
        if getattr(memo, "retry", None) is None:
            memo.retry = RetryPolicy()
        memo.gates = {}
        memo.locks_guard = threading.Lock()

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry)
    def changed(name: str, namespace: str | None, memo: Any, retry: int, **_: Any) -> None:
        _reconcile(memo, namespace or "default", name, retry, strict=True)

    def child_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences", []):
            if ref.get("kind") == names.KIND and ref.get("apiVersion") == names.API_VERSION:
                _reconcile(memo, body["metadata"]["namespace"], ref["name"], 0, strict=False)

    # Every watched child kind of children.py: status follows pod (or KServe) readiness, and
    # an edited or deleted child is put back. A kind whose API is not installed (KServe's
    # InferenceService) is simply never found by kopf, and its handler never fires.
    for kind in children.WATCHED:
        kopf.on.event(kind.group, kind.version, kind.plural, labels=MANAGED_BY, registry=registry)(
            child_event
        )

    @kopf.on.event("", "v1", "pods", labels=RUNTIME_POD, when=_serves_lora, registry=registry)
    def pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # Runtime pods belong to a ReplicaSet; the instance label names their resource.
        instance = body.get("metadata", {}).get("labels", {}).get(names.LABEL_INSTANCE)
        if instance:
            _reconcile(memo, body["metadata"]["namespace"], instance, 0, strict=False)

    @kopf.on.delete(*RESOURCE, optional=True, registry=registry)
    def deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # optional=True: no finalizer, so deletion never waits for the operator; the
        # children go with the resource through their ownerReferences.
        logger.info("deleted; Kubernetes garbage-collects its Deployment and Service")

    return registry


@dataclass(frozen=True)
class RetryPolicy:
    """Delays before retrying a pass the API failed: `first`, doubling up to `cap` seconds."""

    first: float = 1.0
    cap: float = 60.0

    def delay(self, retry: int) -> float:
        return min(self.cap, self.first * 2**retry)


@dataclass
class _Gate:
    """One resource's passes: one at a time, at most one event-driven pass queued."""

    running: threading.Lock = field(default_factory=threading.Lock)
    queued: bool = False  # guarded by memo.locks_guard


def _reconcile(memo: kopf.Memo, namespace: str, name: str, retry: int, *, strict: bool) -> None:
    client: KubeClient = memo.client
    # Several triggers fire for one resource at once (its own change, its children's and
    # pods' events); one pass at a time, each on a fresh read, keeps status and events
    # consistent. An event that finds a pass already queued is dropped: that pass has read
    # nothing yet, so it will see this change too — and a burst of pod events never ties
    # up kopf's worker threads waiting on one resource. Resource changes (`strict`) always
    # get a pass of their own, for kopf's retry and PermanentError bookkeeping.
    gate = _gate_for(memo, namespace, name)
    if not strict:
        with memo.locks_guard:
            if gate.queued:
                return
            gate.queued = True
    with gate.running:
        if not strict:
            with memo.locks_guard:
                gate.queued = False
        which = {"llmdeployment": f"{namespace}/{name}"}
        logger.debug("reconcile started", extra=which)
        try:
            body = client.get(names.KIND, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # gone or going: nothing to converge, children follow the owner
            result = reconcile(client, body, adapters=memo.adapters)
        except ApiError as err:
            if err.status == 404:
                return  # deleted while we worked; its children follow it
            delay = memo.retry.delay(retry)
            raise kopf.TemporaryError(f"Kubernetes API error: {err}", delay=delay) from err
        else:
            for event in result.events:
                kopf.event(_ref(body), type=event.type, reason=event.reason, message=event.message)
        finally:
            logger.debug("reconcile finished", extra=which)
    if result.error is not None and strict:
        if result.error.retryable:  # e.g. a CRD to install: no edit of the spec needed
            raise kopf.TemporaryError(str(result.error), delay=memo.retry.delay(retry))
        raise kopf.PermanentError(str(result.error))


def _serves_lora(body: kopf.Body, **_: Any) -> bool:
    """Only pods started with LoRA: adapters are what pod events are watched for."""
    containers = body.get("spec", {}).get("containers") or []
    return any("--enable-lora" in (c.get("args") or []) for c in containers)


def _gate_for(memo: kopf.Memo, namespace: str, name: str) -> _Gate:
    with memo.locks_guard:
        gate: _Gate = memo.gates.setdefault((namespace, name), _Gate())
        return gate


def _ref(body: Mapping[str, Any]) -> kopf.Body:
    return kopf.Body(dict(body))  # type: ignore[arg-type]
