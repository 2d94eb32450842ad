"""Autoscalers for the runtime Deployment: an autoscaling/v2 HPA or a KEDA ScaledObject.

Both scale the child Deployment or LeaderWorkerSet (never the LLMDeployment), rendered
without `replicas` while they do: the autoscaler is the only writer of the count, so
nothing it does is a diff against what the operator applies or what the user wrote.

Signals (one table, shared with the KServe renderer):

    metric           Prometheus series (runtime)        HPA custom metric (adapter)
    requestsWaiting  pinnace:num_requests_waiting       pinnace_num_requests_waiting
    requestsRunning  pinnace:num_requests_running       pinnace_num_requests_running
    kvCacheUsage     pinnace:kv_cache_usage_perc        pinnace_kv_cache_usage_perc
    cpu              (resource metric: % of the CPU request)

The HPA reads the custom metrics through prometheus-adapter (rules in docs/operator.md:
`pinnace:x` is exposed as `pinnace_x`); KEDA queries Prometheus itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pinnace.operator import names
from pinnace.operator.autoscaling_spec import Autoscaling, ScalingMetric
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import labels


@dataclass(frozen=True)
class Signal:
    series: str | None  # Prometheus series the runtime exports; None for cpu
    default_target: float

    @property
    def custom_metric(self) -> str:
        """The name prometheus-adapter serves it under (colons are not portable there)."""
        return (self.series or "").replace(":", "_")


SIGNALS: dict[str, Signal] = {
    "requestsWaiting": Signal("pinnace:num_requests_waiting", 2),
    "requestsRunning": Signal("pinnace:num_requests_running", 16),
    "kvCacheUsage": Signal("pinnace:kv_cache_usage_perc", 0.8),
    "cpu": Signal(None, 80),
}


def target_of(metric: ScalingMetric) -> float:
    return metric.target if metric.target is not None else SIGNALS[metric.metric].default_target


def quantity(value: float) -> str:
    """A Kubernetes quantity for a per-pod target: 2 -> "2", 0.8 -> "800m"."""
    if value == int(value):
        return str(int(value))
    return f"{round(value * 1000)}m"


def prometheus_query(llmd: LLMDeployment, metric: ScalingMetric) -> str:
    """The load of all replicas; KEDA divides it by the per-replica target."""
    series = SIGNALS[metric.metric].series
    selector = f'namespace="{llmd.namespace}",model_name="{llmd.served_name}"'
    return f"sum({series}{{{selector}}})"


def prometheus_url(scaling: Autoscaling) -> str:
    return scaling.prometheus_url or names.DEFAULT_PROMETHEUS_URL


def render_autoscaler(llmd: LLMDeployment) -> dict[str, Any] | None:
    """The HPA or ScaledObject for Deployment mode; None without autoscaling."""
    scaling = llmd.spec.autoscaling
    if scaling is None or llmd.spec.serving.is_kserve:
        return None
    if scaling.engine == "keda":
        return labels.stamp_applied_hash(_scaled_object(llmd, scaling))
    return labels.stamp_applied_hash(_hpa(llmd, scaling))


def _target_ref(llmd: LLMDeployment) -> dict[str, str]:
    """The Deployment, or the LeaderWorkerSet of a multi-node model: its scale subresource
    counts groups, and its selector picks their leaders, which export the metrics."""
    if llmd.is_multi_node:
        return {"apiVersion": names.LWS_API_VERSION, "kind": names.LWS_KIND, "name": llmd.name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": llmd.name}


def _scale_down(scaling: Autoscaling) -> dict[str, Any]:
    return {"scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_delay_seconds}}


def _hpa(llmd: LLMDeployment, scaling: Autoscaling) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "scaleTargetRef": _target_ref(llmd),
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [_hpa_metric(m) for m in scaling.scaling_metrics],
            "behavior": _scale_down(scaling),
        },
    }


def _hpa_metric(metric: ScalingMetric) -> dict[str, Any]:
    target = target_of(metric)
    if metric.metric == "cpu":
        utilization = {"type": "Utilization", "averageUtilization": int(target)}
        return {"type": "Resource", "resource": {"name": "cpu", "target": utilization}}
    # Pods metrics: the HPA averages them over the Deployment's pods.
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": SIGNALS[metric.metric].custom_metric},
            "target": {"type": "AverageValue", "averageValue": quantity(target)},
        },
    }


def _scaled_object(llmd: LLMDeployment, scaling: Autoscaling) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "scaleTargetRef": _target_ref(llmd),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            # Only used for the last step to zero; scale-down between >0 counts is the HPA's.
            "cooldownPeriod": scaling.scale_down_delay_seconds,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _scale_down(scaling)}},
            "triggers": [_keda_trigger(llmd, scaling, m) for m in scaling.scaling_metrics],
        },
    }


def _keda_trigger(
    llmd: LLMDeployment, scaling: Autoscaling, metric: ScalingMetric
) -> dict[str, Any]:
    target = target_of(metric)
    if metric.metric == "cpu":
        return {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(int(target))}}
    return {
        "type": "prometheus",
        "name": re.sub(r"(?<!^)([A-Z])", r"-\1", metric.metric).lower(),  # requests-waiting
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": prometheus_url(scaling),
            "query": prometheus_query(llmd, metric),
            "threshold": f"{target:g}",
        },
    }
