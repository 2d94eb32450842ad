"""KServe mode: a ServingRuntime that runs `pinnace serve`, and the InferenceService using it.

Split of responsibilities, following KServe's own model:

    ServingRuntime <name>     the container: `pinnace serve` args, env, probes, security
    InferenceService <name>   the pod: weights (storageUri), resources, scheduling, replicas
                              or autoscaling, deployment mode

KServe's storage initializer fetches the weights into /mnt/models (so no download init
containers here), and KServe creates the Deployment/HPA (RawDeployment) or the Knative
Service (Serverless) itself. The per-resource runtime has `autoSelect: false`, so other
InferenceServices never pick up this model's flags; the chart's ClusterServingRuntime is
the generic one for hand-written InferenceServices.
"""

from __future__ import annotations

import copy
from typing import Any

from pinnace.operator import names
from pinnace.operator.autoscaling_spec import Autoscaling
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import args as argmod
from pinnace.operator.render import autoscaling, labels, sources
from pinnace.operator.render.deployment import (
    POD_SECURITY,
    TERMINATION_GRACE_SECONDS,
    container_ports,
    resources,
    runtime_container,
    scheduling,
)

ISVC_API_VERSION = f"{names.KSERVE_GROUP}/v1beta1"
RUNTIME_API_VERSION = f"{names.KSERVE_GROUP}/v1alpha1"
# Plus the OpenAI API under /v1, which KServe passes through. grpc-v2 where the pod serves
# it (KServe's RawDeployment adds the container's second port to its Service).
PROTOCOL_VERSIONS = ["v1", "v2"]
GRPC_PROTOCOL_VERSION = "grpc-v2"


def supported_model_formats(*, auto_select: bool) -> list[dict[str, Any]]:
    return [
        {"name": names.KSERVE_MODEL_FORMAT, "version": "1", "autoSelect": auto_select},
        {"name": "huggingface", "autoSelect": False},
    ]


def render_serving_runtime(llmd: LLMDeployment) -> dict[str, Any]:
    container = runtime_container(llmd, [m for s in _all_sources(llmd) for m in s.mounts])
    port = llmd.spec.serving.port
    container["name"] = names.KSERVE_CONTAINER_NAME
    container["ports"] = container_ports(llmd, names.KSERVE_PORT_NAME)
    container.pop("resources")  # the InferenceService sets them (KServe merges the two)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = port  # Knative wants the number, not a name
    if llmd.spec.serving.is_serverless:
        # Knative owns the pod lifecycle: it drains through its queue-proxy and rejects
        # startup probes and lifecycle hooks on the user container.
        container.pop("startupProbe")
        container.pop("lifecycle")
    runtime = {
        "apiVersion": RUNTIME_API_VERSION,
        "kind": "ServingRuntime",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "supportedModelFormats": supported_model_formats(auto_select=False),
            "protocolVersions": PROTOCOL_VERSIONS
            + ([GRPC_PROTOCOL_VERSION] if argmod.serves_grpc(llmd) else []),
            "multiModel": False,
            # KServe's metrics aggregation / Prometheus scraping reads these.
            "annotations": {
                "prometheus.kserve.io/port": str(port),
                "prometheus.kserve.io/path": "/metrics",
            },
            "containers": [container],
        },
    }
    return labels.stamp_applied_hash(runtime)


def render_inference_service(llmd: LLMDeployment) -> dict[str, Any]:
    model: dict[str, Any] = {
        "modelFormat": {"name": names.KSERVE_MODEL_FORMAT},
        "runtime": llmd.name,
    }
    res = resources(llmd)
    if res:
        model["resources"] = res
    predictor: dict[str, Any] = {**_replicas(llmd), "model": model}
    fetched = [(s.storage_uri, s.path) for s in _all_sources(llmd) if s.storage_uri]
    if argmod.uses_storage_uris(llmd):
        predictor["storageUris"] = [{"uri": uri, "mountPath": path} for uri, path in fetched]
    elif fetched:
        model["storageUri"] = fetched[0][0]
    predictor.update(_pod_fields(llmd))
    meta = labels.metadata(llmd, llmd.name)
    meta["annotations"] = _annotations(llmd)
    isvc = {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }
    return labels.stamp_applied_hash(isvc)


def _all_sources(llmd: LLMDeployment) -> list[sources.Source]:
    return [argmod.model_source(llmd), *(s for _, s in argmod.kserve_adapter_sources(llmd))]


def _pod_fields(llmd: LLMDeployment) -> dict[str, Any]:
    kserve = llmd.spec.serving.kserve
    volumes = [
        {"name": sources.CACHE_VOLUME, "emptyDir": {}},
        {"name": sources.TMP_VOLUME, "emptyDir": {}},
    ]
    if llmd.spec.engine.world_size > 1:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "volumes": volumes,
    }
    if not llmd.spec.serving.is_serverless:  # Knative refuses these without feature flags
        pod["securityContext"] = copy.deepcopy(POD_SECURITY)
        pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
    if kserve is not None and kserve.service_account_name:
        pod["serviceAccountName"] = kserve.service_account_name
    return {**pod, **scheduling(llmd)}


def _annotations(llmd: LLMDeployment) -> dict[str, str]:
    serverless = llmd.spec.serving.is_serverless
    out = {
        names.ANNOTATION_KSERVE_DEPLOYMENT_MODE: "Serverless" if serverless else "RawDeployment",
        f"{names.KSERVE_GROUP}/enable-prometheus-scraping": "true",
    }
    scaling = llmd.spec.autoscaling
    if scaling is not None and serverless:
        delay = f"{scaling.scale_down_delay_seconds}s"
        out["autoscaling.knative.dev/scale-down-delay"] = delay
    elif scaling is not None:
        out[names.ANNOTATION_KSERVE_AUTOSCALER_CLASS] = scaling.engine
    return out


def _replicas(llmd: LLMDeployment) -> dict[str, Any]:
    """minReplicas/maxReplicas, and how KServe should scale between them."""
    scaling = llmd.spec.autoscaling
    if scaling is None:  # a fixed count: both bounds equal
        return {"minReplicas": llmd.replicas, "maxReplicas": llmd.replicas}
    out: dict[str, Any] = {"minReplicas": scaling.min_replicas, "maxReplicas": scaling.max_replicas}
    [first, *_] = scaling.scaling_metrics
    if llmd.spec.serving.is_serverless:
        # Knative's KPA: in-flight requests per pod (validated: requestsRunning only).
        out.update(scaleMetric="concurrency", scaleTarget=int(autoscaling.target_of(first)))
    elif scaling.engine == "hpa":
        # KServe's HPA class: CPU utilization (validated: cpu only).
        out.update(scaleMetric="cpu", scaleTarget=int(autoscaling.target_of(first)))
    else:
        out["autoScaling"] = _keda_spec(llmd, scaling)
    return out


def _keda_spec(llmd: LLMDeployment, scaling: Autoscaling) -> dict[str, Any]:
    metrics = []
    for metric in scaling.scaling_metrics:
        target = autoscaling.target_of(metric)
        if metric.metric == "cpu":
            utilization = {"type": "Utilization", "averageUtilization": int(target)}
            metrics.append({"type": "Resource", "resource": {"name": "cpu", "target": utilization}})
            continue
        query = {
            "backend": "prometheus",
            "serverAddress": autoscaling.prometheus_url(scaling),
            "query": autoscaling.prometheus_query(llmd, metric),
        }
        target_value = {"type": "AverageValue", "averageValue": autoscaling.quantity(target)}
        metrics.append({"type": "External", "external": {"metric": query, "target": target_value}})
    behavior = {"scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_delay_seconds}}
    return {"metrics": metrics, "behavior": behavior}
