"""The runtime Deployment: `pinnace serve` with probes, GPUs, cache and a locked-down pod."""

from __future__ import annotations

import copy
import math
from typing import Any

from pinnace.operator import names
from pinnace.operator.fit import startup_budget_seconds
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import args as argmod
from pinnace.operator.render import labels, sources

RUNTIME_UID = 1000
# Long enough to finish streaming responses after the pod leaves the Service endpoints
# (names.py: preStop sleep, then `serve --shutdown-timeout`, then margin).
TERMINATION_GRACE_SECONDS = names.TERMINATION_GRACE_SECONDS
PRESTOP_SLEEP_SECONDS = names.PRESTOP_SLEEP_SECONDS  # let kube-proxy/ingress drop the endpoint
PROBE_PERIOD_SECONDS = 10

CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": RUNTIME_UID,
    "runAsGroup": RUNTIME_UID,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUNTIME_UID,
    "runAsGroup": RUNTIME_UID,
    "fsGroup": RUNTIME_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def render_deployment(llmd: LLMDeployment) -> dict[str, Any]:
    template = with_pod_hash(pod_template(llmd))
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels.selector_labels(llmd)},
        "strategy": strategy(llmd),
        "template": template,
    }
    if llmd.replicas is not None:
        # With autoscaling the field is left out, so the HPA/KEDA is its only writer and
        # server-side apply never puts our count back over theirs.
        spec = {"replicas": llmd.replicas, **spec}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": spec,
    }
    return labels.stamp_applied_hash(deployment)


def strategy(llmd: LLMDeployment) -> dict[str, Any]:
    """spec.rollout; by default a new pod comes up before an old one goes (no capacity
    lost, one extra replica's GPUs needed): see `spec.Rollout` for scarce GPUs."""
    rollout = llmd.spec.rollout
    if rollout.strategy == "Recreate":
        return {"type": "Recreate"}
    surge = {"maxSurge": rollout.surge, "maxUnavailable": rollout.unavailable}
    return {"type": "RollingUpdate", "rollingUpdate": surge}


def with_pod_hash(template: dict[str, Any]) -> dict[str, Any]:
    """The template annotated with its own hash: it changes exactly when pods must roll."""
    pod_hash = labels.content_hash(template)
    template["metadata"]["annotations"] = {names.ANNOTATION_POD_SPEC_HASH: pod_hash}
    return template


def pod_template(llmd: LLMDeployment) -> dict[str, Any]:
    """The runtime pod that serves the API (a Deployment's pods, a group's leader)."""
    # The model (and a speculative draft), not adapters: those are hot-loaded from paths
    # every pod already has (the image, the cache, the model's claim), so the adapter list
    # never changes this template.
    all_sources = argmod.pod_sources(llmd)
    volumes = [
        _cache_volume(llmd),
        {"name": sources.TMP_VOLUME, "emptyDir": {}},
        *(v for s in all_sources for v in s.volumes),
    ]
    if llmd.spec.engine.world_size > 1:  # NCCL needs a real /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    init_containers = [
        {**s.download, "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
        for s in all_sources
        if s.download
    ]
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the runtime never talks to the API
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [runtime_container(llmd, [m for s in all_sources for m in s.mounts])],
        "volumes": volumes,
    }
    if init_containers:
        pod["initContainers"] = init_containers
    if llmd.lora_enabled:  # Ready only once the operator has loaded the adapters into it
        pod["readinessGates"] = [{"conditionType": names.ADAPTERS_GATE}]
    pod.update(scheduling(llmd))
    return {"metadata": {"labels": labels.common_labels(llmd)}, "spec": pod}


def _cache_volume(llmd: LLMDeployment) -> dict[str, Any]:
    claim = llmd.cache_claim
    if claim is None:
        return {"name": sources.CACHE_VOLUME, "emptyDir": {}}
    return {"name": sources.CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}


def runtime_container(llmd: LLMDeployment, source_mounts: list[dict[str, Any]]) -> dict[str, Any]:
    spec = llmd.spec
    mounts = [
        {"name": sources.CACHE_VOLUME, "mountPath": sources.CACHE_DIR},
        {"name": sources.TMP_VOLUME, "mountPath": sources.TMP_DIR},
        *source_mounts,
    ]
    if spec.engine.world_size > 1:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": names.CONTAINER_NAME,
        "image": llmd.image,
        "command": ["pinnace"],
        "args": argmod.serve_args(llmd),
        "ports": container_ports(llmd, names.PORT_NAME),
        "env": _env(llmd),
        "resources": resources(llmd),
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        **_probes(llmd),
    }
    return container


def container_ports(llmd: LLMDeployment, http_name: str) -> list[dict[str, Any]]:
    """HTTP first (probes, metrics and the tests' fake pods use ports[0]), then gRPC."""
    ports = [{"name": http_name, "containerPort": llmd.spec.serving.port, "protocol": "TCP"}]
    if argmod.serves_grpc(llmd):
        ports.append(
            {"name": names.GRPC_PORT_NAME, "containerPort": names.GRPC_PORT, "protocol": "TCP"}
        )
    return ports


def _env(llmd: LLMDeployment) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{sources.CACHE_DIR}/hf"},
        {"name": "HOME", "value": sources.TMP_DIR},
        {"name": "TMPDIR", "value": sources.TMP_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    key_ref = llmd.spec.serving.api_key_secret_ref
    if key_ref is not None:  # via env, not argv: argv shows up in `ps` and in status
        ref = {"name": key_ref.name, "key": key_ref.key}
        env.append({"name": "PINNACE_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    env += [{"name": var.name, "value": var.value} for var in llmd.spec.engine.env]
    return env


def resources(llmd: LLMDeployment) -> dict[str, Any]:
    res = llmd.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = res.cpu  # no CPU limit: throttling a tokenizer only adds latency
    if res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpu is not None and res.gpu.count > 0:
        requests[res.gpu.resource_name] = limits[res.gpu.resource_name] = str(res.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probes(llmd: LLMDeployment) -> dict[str, Any]:
    def http(period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": names.PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    # The startup budget grows with model size so a slow load is not killed half-way.
    startup_failures = math.ceil(startup_budget_seconds(llmd) / PROBE_PERIOD_SECONDS)
    return {
        "startupProbe": http(PROBE_PERIOD_SECONDS, startup_failures),
        "readinessProbe": http(5, 3),
        "livenessProbe": http(PROBE_PERIOD_SECONDS, 6),
    }


def scheduling(llmd: LLMDeployment) -> dict[str, Any]:
    sched = llmd.spec.scheduling
    out: dict[str, Any] = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations
        ]
    if sched.affinity:
        out["affinity"] = sched.affinity
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    if sched.runtime_class_name:
        out["runtimeClassName"] = sched.runtime_class_name
    return out
