"""`spec.autoscaling`: replicas follow LLM load signals (HPA, KEDA, or KServe's autoscalers)
instead of a fixed `spec.replicas`; render/autoscaling.py turns it into the objects."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pinnace.operator.spec_base import URL_PATTERN, Rule, SpecModel

ScalingMetricName = Literal["requestsWaiting", "kvCacheUsage", "requestsRunning", "cpu"]
_TARGET_DESCRIPTION = (
    "Per-replica target: requests (requestsWaiting, requestsRunning), a fraction 0-1 "
    "(kvCacheUsage), or percent of the CPU request (cpu). Default depends on the metric."
)


class ScalingMetric(SpecModel):
    """One signal to scale on; with several the autoscaler takes the largest replica count."""

    metric: ScalingMetricName
    target: float | None = Field(default=None, gt=0, description=_TARGET_DESCRIPTION)


class Autoscaling(SpecModel):
    """Replicas follow LLM load signals; replaces spec.replicas."""

    engine: Literal["hpa", "keda"] = Field(
        default="hpa",
        description="hpa: autoscaling/v2 HPA (custom metrics via prometheus-adapter); "
        "keda: a KEDA ScaledObject with Prometheus triggers (allows minReplicas 0).",
    )
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    metric: ScalingMetricName | None = Field(
        default=None, description="One metric (shorthand for metrics: [{metric, target}])."
    )
    target: float | None = Field(default=None, gt=0, description=_TARGET_DESCRIPTION)
    metrics: list[ScalingMetric] = Field(default_factory=list, max_length=4)
    scale_down_delay_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="How long load must stay low before replicas are removed.",
    )
    prometheus_url: str | None = Field(
        default=None,
        pattern=URL_PATTERN,
        max_length=1024,
        description="Prometheus that KEDA queries "
        "(default: http://prometheus-operated.monitoring.svc:9090, kube-prometheus-stack).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.minReplicas <= self.maxReplicas",
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
            lambda a: a.min_replicas <= a.max_replicas,
        ),
        Rule(
            "!has(self.metric) || !has(self.metrics)",
            "autoscaling: set metric (with target) or metrics, not both",
            lambda a: a.metric is None or not a.metrics,
        ),
        Rule(
            "!has(self.target) || has(self.metric)",
            "autoscaling.target goes with autoscaling.metric",
            lambda a: a.target is None or a.metric is not None,
        ),
        Rule(
            "!has(self.metrics)"
            " || self.metrics.all(m, self.metrics.exists_one(n, n.metric == m.metric))",
            "autoscaling.metrics: each metric at most once",
            lambda a: len({m.metric for m in a.metrics}) == len(a.metrics),
        ),
        Rule(
            "!has(self.prometheusUrl) || self.engine == 'keda'",
            "autoscaling.prometheusUrl is read by KEDA only (engine: keda)",
            lambda a: a.prometheus_url is None or a.engine == "keda",
        ),
    )

    @property
    def scaling_metrics(self) -> list[ScalingMetric]:
        """The metrics to scale on, whichever form was used (default: requestsWaiting)."""
        if self.metrics:
            return list(self.metrics)
        return [ScalingMetric(metric=self.metric or "requestsWaiting", target=self.target)]
