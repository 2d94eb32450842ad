"""Deployment mode: where each LoRA adapter is loaded from, and the Jobs that put it there.

Runtime pods never change with `spec.adapters`: the operator hot-loads each adapter over
HTTP (`adapter_sync.py`) from a path every pod already has:

    file:///p                      /p              (in the image, or on the cache volume)
    pvc://<cache claim>/p          /cache/p
    pvc://<model's claim>/p        /mnt/model-pvc/p
    anything else                  /cache/adapters/<scheme>/<path>, copied by a fetch Job

A fetch Job mounts the cache claim the pods mount, copies the adapter once and stays (the
record that the files are there) until the adapter leaves the spec. Its name carries a
hash of its spec: a Job's pod template is immutable, so a changed fetch is a new Job and
the old one is pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment, is_fetched
from pinnace.operator.render import labels, sources
from pinnace.operator.render.deployment import CONTAINER_SECURITY, POD_SECURITY
from pinnace.operator.spec import Adapter, SecretRef

FETCH_COMPONENT = "adapter-fetch"
FETCH_POD_NAME = "pinnace-adapter-fetch"  # never the runtime's name: Services select on it
ADAPTERS_DIR = f"{sources.CACHE_DIR}/adapters"
FETCH_BACKOFF_LIMIT = 3
SOURCE_VOLUME = "source"
SOURCE_DIR = "/mnt/source"
ANNOTATION_ADAPTER_URI = f"{names.GROUP}/adapter-uri"


@dataclass(frozen=True)
class AdapterSource:
    name: str
    uri: str
    path: str  # the lora_path the runtime loads it from
    fetch_job: str | None = None  # the Job that must complete before it can be loaded


def adapter_sources(llmd: LLMDeployment) -> list[AdapterSource]:
    """Every declared adapter with its load path (Deployment mode)."""
    out = []
    for adapter in llmd.spec.adapters:
        scheme, rest = adapter.uri.split("://", 1)
        if is_fetched(llmd, adapter):
            job = render_fetch_job(llmd, adapter)["metadata"]["name"]
            out.append(AdapterSource(adapter.name, adapter.uri, fetched_path(adapter.uri), job))
        elif scheme == "file":
            out.append(AdapterSource(adapter.name, adapter.uri, "/" + rest.lstrip("/")))
        else:  # pvc:// on a claim the pods mount anyway
            claim, _, sub = rest.partition("/")
            on_cache = claim == llmd.cache_claim
            base = sources.CACHE_DIR if on_cache else sources.pvc_mount_dir("model")
            out.append(AdapterSource(adapter.name, adapter.uri, f"{base}/{sub}".rstrip("/")))
    return out


def fetched_path(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{ADAPTERS_DIR}/{scheme}/{rest.strip('/')}"


def render_fetch_jobs(llmd: LLMDeployment) -> list[dict[str, Any]]:
    """One Job per adapter URI to fetch (two names for one URI share it)."""
    if llmd.spec.serving.is_kserve:
        return []
    jobs: dict[str, dict[str, Any]] = {}
    for adapter in llmd.spec.adapters:
        if is_fetched(llmd, adapter):
            job = render_fetch_job(llmd, adapter)
            jobs.setdefault(job["metadata"]["name"], job)
    return list(jobs.values())


def fetch_job_selector(llmd: LLMDeployment) -> str:
    """Label selector of this resource's fetch Jobs (for pruning)."""
    return f"{names.LABEL_INSTANCE}={llmd.name},{names.LABEL_COMPONENT}={FETCH_COMPONENT}"


def render_fetch_job(llmd: LLMDeployment, adapter: Adapter) -> dict[str, Any]:
    scheme, rest = adapter.uri.split("://", 1)
    dest = fetched_path(adapter.uri)
    if scheme == "pvc":
        container, volumes = _copier(llmd, rest, dest)
    else:
        container, volumes = sources.downloader(
            scheme, rest, dest, "fetch", llmd.image, _credentials(llmd, adapter), None
        )
    container = {**container, "name": "fetch", "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
    claim = llmd.cache_claim
    if claim is None:  # parse_llmdeployment refuses such a spec; a clear error all the same
        raise ValueError(f"adapters: {adapter.name} needs storage.cache to be fetched into")
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": [
            {"name": sources.CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}},
            {"name": sources.TMP_VOLUME, "emptyDir": {}},
            *volumes,
        ],
        "affinity": _next_to_runtime_pods(llmd),
        **_placement(llmd),
    }
    pod_labels = {
        names.LABEL_NAME: FETCH_POD_NAME,
        names.LABEL_INSTANCE: llmd.name,
        names.LABEL_COMPONENT: FETCH_COMPONENT,
    }
    spec = {
        "backoffLimit": FETCH_BACKOFF_LIMIT,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod},
    }
    # At most 59 characters: the Job controller copies the name into a label value (<= 63).
    name = f"{llmd.name[:40]}-fetch-{labels.content_hash([adapter.uri, spec])[:12]}"
    meta = labels.metadata(llmd, name)
    meta["labels"][names.LABEL_COMPONENT] = FETCH_COMPONENT
    meta["annotations"] = {ANNOTATION_ADAPTER_URI: adapter.uri}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
    return labels.stamp_applied_hash(job)


def fetch_state(job: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """(files are in place, why they never will be) from a live fetch Job."""
    if job is None:
        return False, None
    status = job.get("status") or {}
    conditions = {
        c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
    }
    if "Complete" in conditions or int(status.get("succeeded") or 0) > 0:
        return True, None
    if "Failed" in conditions:
        failed = conditions["Failed"]
        detail = failed.get("message") or failed.get("reason") or "failed"
        return False, f"fetch Job {job['metadata']['name']} failed: {detail}"
    return False, None


def _copier(
    llmd: LLMDeployment, rest: str, dest: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """pvc:// on a claim the pods do not mount: copy it into the cache with the runtime image."""
    claim, _, sub = rest.partition("/")
    src = f"{SOURCE_DIR}/{sub}".rstrip("/")
    container = {
        "name": "fetch",
        "image": llmd.image,
        "command": ["sh", "-c", 'mkdir -p "$2" && cp -R "$1/." "$2/"', "fetch", src, dest],
        "volumeMounts": [
            {"name": sources.CACHE_VOLUME, "mountPath": sources.CACHE_DIR},
            {"name": SOURCE_VOLUME, "mountPath": SOURCE_DIR, "readOnly": True},
        ],
    }
    claim_ref = {"claimName": claim, "readOnly": True}
    return container, [{"name": SOURCE_VOLUME, "persistentVolumeClaim": claim_ref}]


def _credentials(llmd: LLMDeployment, adapter: Adapter) -> SecretRef | None:
    # The model's download credentials serve adapters from the same store only.
    model = llmd.spec.model
    scheme = model.uri.split("://", 1)[0]
    same_store = scheme in ("hf", "s3", "gs") and adapter.uri.startswith(f"{scheme}://")
    return model.credentials_secret_ref if same_store else None


def _next_to_runtime_pods(llmd: LLMDeployment) -> dict[str, Any]:
    # A ReadWriteOnce cache can only be mounted on the node that already has it.
    term = {
        "labelSelector": {"matchLabels": labels.selector_labels(llmd)},
        "topologyKey": "kubernetes.io/hostname",
    }
    preferred = [{"weight": 100, "podAffinityTerm": term}]
    return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}


def _placement(llmd: LLMDeployment) -> dict[str, Any]:
    """The runtime's node selector and tolerations, so the Job may run where its pods do."""
    sched = llmd.spec.scheduling
    out: dict[str, Any] = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations
        ]
    return out
