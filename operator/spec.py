"""The `LLMDeployment` spec: one pydantic model that is both the parser and the CRD schema.

The CRD's openAPIV3Schema is generated from these classes (`crd.py`), so the two cannot
drift. The building blocks (`SpecModel`, `Rule`, value patterns) are in spec_base.py,
`spec.engine` in engine_spec.py; both are re-exported here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from pinnace.operator.engine_spec import DType, Engine, EnvVar, Quantization, Runner, Speculative
from pinnace.operator.spec_base import (
    ADAPTER_NAME_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    DOWNLOAD_SCHEMES,
    MODEL_URI_PATTERN,
    PARAM_COUNT_PATTERN,
    QUANTITY_PATTERN,
    URL_PATTERN,
    Quantity,
    Rule,
    SpecModel,
)

__all__ = [
    "DType",
    "Engine",
    "EnvVar",
    "Quantity",
    "Quantization",
    "Rule",
    "Runner",
    "SpecModel",
    "Speculative",
]


class SecretRef(SpecModel):
    """A Secret in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")


class SecretKeyRef(SpecModel):
    """One key of a Secret in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(default="api-key", min_length=1, description="Key within the Secret.")


class ModelSource(SpecModel):
    """Where the weights come from and how clients name the model."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="hf://org/name, pvc://claim/path, s3://bucket/path, gs://bucket/path, "
        "or file:///path baked into the image.",
    )
    served_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Model name clients pass in requests (default: metadata.name).",
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=255, description="hf:// revision (branch/tag/sha)."
    )
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret for the download: HF_TOKEN (hf://), AWS_* keys (s3://), "
        "or key.json (gs://).",
    )
    parameter_count: str | None = Field(
        default=None,
        pattern=PARAM_COUNT_PATTERN,
        description="Size hint for the GPU fit check and startup budget, e.g. 1.5B or 135M.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.revision) || self.uri.startsWith('hf://')",
            "model.revision applies only to hf:// models",
            lambda m: m.revision is None or m.uri.startswith("hf://"),
        ),
        Rule(
            "!has(self.credentialsSecretRef) || self.uri.startsWith('hf://')"
            " || self.uri.startsWith('s3://') || self.uri.startsWith('gs://')",
            "model.credentialsSecretRef is used only to download hf://, s3:// or gs:// models",
            lambda m: m.credentials_secret_ref is None or m.uri.startswith(DOWNLOAD_SCHEMES),
        ),
    )


class GPU(SpecModel):
    """Accelerators per replica."""

    count: int = Field(default=1, ge=0, le=16, description="GPUs per replica.")
    resource_name: str = Field(
        default="nvidia.com/gpu", min_length=1, description="Extended resource to request."
    )
    memory: Quantity | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        description="Memory of one GPU (e.g. 80Gi); enables the fit check.",
    )


class Resources(SpecModel):
    """Compute per replica."""

    gpu: GPU | None = Field(default=None, description="GPUs; absent means CPU-only.")
    cpu: Quantity | None = Field(default=None, pattern=QUANTITY_PATTERN, description="CPU request.")
    memory: Quantity | None = Field(
        default=None, pattern=QUANTITY_PATTERN, description="Memory request and limit."
    )

    @property
    def gpu_count(self) -> int:
        return self.gpu.count if self.gpu is not None else 0


class Adapter(SpecModel):
    """A LoRA adapter served next to the base model under its own name (hot-loaded)."""

    name: str = Field(
        pattern=ADAPTER_NAME_PATTERN, max_length=63, description="Model name clients pass."
    )
    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="file:///path (image or cache volume) and pvc:// on the model's or cache "
        "claim load directly; other pvc://, hf://, s3:// and gs:// are fetched into "
        "storage.cache by a Job first.",
    )


ServingMode = Literal["Deployment", "KServe"]


class KServe(SpecModel):
    """How the KServe InferenceService runs (serving.mode: KServe)."""

    deployment_mode: Literal["RawDeployment", "Serverless"] = Field(
        default="RawDeployment",
        description="RawDeployment: a Deployment + HPA/KEDA; Serverless: Knative, scale to zero.",
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="ServiceAccount of the predictor pods; KServe's storage initializer "
        "takes download credentials from its Secrets.",
    )


class Serving(SpecModel):
    """How clients reach the runtime."""

    mode: ServingMode = Field(
        default="Deployment",
        description="Deployment: a Deployment + Service run by the operator; "
        "KServe: a ServingRuntime + InferenceService run by KServe.",
    )
    port: int = Field(default=8000, ge=1, le=65535)
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Require this API key (Secret key) on /v1 requests."
    )
    kserve: KServe | None = Field(default=None, description="KServe settings (mode: KServe).")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.kserve) || self.mode == 'KServe'",
            "serving.kserve applies only with serving.mode: KServe",
            lambda s: s.kserve is None or s.mode == "KServe",
        ),
    )

    @property
    def is_kserve(self) -> bool:
        return self.mode == "KServe"

    @property
    def is_serverless(self) -> bool:
        return self.kserve is not None and self.kserve.deployment_mode == "Serverless"


class Cache(SpecModel):
    """A PVC for downloaded weights: an existing claim, or one the operator creates."""

    claim_name: str | None = Field(default=None, pattern=DNS_LABEL_PATTERN, max_length=253)
    size: Quantity | None = Field(default=None, pattern=QUANTITY_PATTERN)
    storage_class_name: str | None = Field(default=None, min_length=1)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = "ReadWriteOnce"

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.claimName) != has(self.size)",
            "storage.cache: set exactly one of claimName (existing PVC) or size (new PVC)",
            lambda c: (c.claim_name is None) != (c.size is None),
        ),
        Rule(
            "!has(self.storageClassName) || has(self.size)",
            "storage.cache.storageClassName applies only with size",
            lambda c: c.storage_class_name is None or c.size is not None,
        ),
    )


class Storage(SpecModel):
    cache: Cache | None = Field(default=None, description="Absent: an emptyDir per pod.")


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


TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class Toleration(SpecModel):
    key: str | None = None
    operator: TolerationOperator | None = None
    value: str | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None


class Scheduling(SpecModel):
    """Copied into the pod spec as is."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


LABEL_MAP_DESCRIPTION = "Labels it must carry (matchLabels)."


# The rollout default is RollingUpdate with maxSurge 1 and maxUnavailable 0: no capacity is
# lost, but a cluster needs room for one extra replica's GPUs. Where GPUs are scarce use
# maxSurge 0 with maxUnavailable 1 (a replica goes down before its replacement starts), or
# Recreate (every old pod goes first: downtime, but never two copies of a model at once).
class Rollout(SpecModel):
    """How pods are replaced when the pod template changes (Deployment mode)."""

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate",
        description="The Deployment's strategy. The default (maxSurge 1, maxUnavailable 0) "
        "needs room for one extra replica's GPUs; where GPUs are scarce set maxSurge 0 and "
        "maxUnavailable 1, or use Recreate (downtime, never two copies at once).",
    )
    max_surge: int | None = Field(
        default=None, ge=0, le=1000, description="Extra pods during a rollout (default 1)."
    )
    max_unavailable: int | None = Field(
        default=None, ge=0, le=1000, description="Pods that may be down at once (default 0)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.strategy == 'RollingUpdate'"
            " || (!has(self.maxSurge) && !has(self.maxUnavailable))",
            "rollout.maxSurge and rollout.maxUnavailable apply only to strategy RollingUpdate",
            lambda r: (
                r.strategy == "RollingUpdate" or (r.max_surge is None and r.max_unavailable is None)
            ),
        ),
        Rule(
            "self.strategy != 'RollingUpdate' || (has(self.maxSurge) ? self.maxSurge : 1)"
            " + (has(self.maxUnavailable) ? self.maxUnavailable : 0) > 0",
            "rollout: maxSurge and maxUnavailable cannot both be 0 (nothing could be replaced)",
            lambda r: r.strategy != "RollingUpdate" or r.surge + r.unavailable > 0,
        ),
    )

    @property
    def surge(self) -> int:
        return 1 if self.max_surge is None else self.max_surge

    @property
    def unavailable(self) -> int:
        return 0 if self.max_unavailable is None else self.max_unavailable


class DisruptionBudget(SpecModel):
    """A PodDisruptionBudget: node drains and cluster upgrades take replicas down one by one."""

    enabled: bool | None = Field(
        default=None,
        description="Default: on when more than one replica may run (replicas > 1, or "
        "autoscaling.maxReplicas > 1); a single replica gets none, so drains are not blocked.",
    )
    max_unavailable: int = Field(
        default=1, ge=1, le=1000, description="Replicas a voluntary disruption may take at once."
    )


class NetworkPeer(SpecModel):
    """Pods allowed in: in namespaces with these labels, and/or with these labels."""

    namespace_labels: dict[str, str] | None = Field(
        default=None,
        description=f"The namespace's labels; absent: this namespace only. {LABEL_MAP_DESCRIPTION}",
    )
    pod_labels: dict[str, str] | None = Field(
        default=None, description=f"The pod's labels; absent: any pod. {LABEL_MAP_DESCRIPTION}"
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.namespaceLabels) || has(self.podLabels)",
            "networkPolicy.allowFrom: each peer needs namespaceLabels or podLabels",
            lambda p: p.namespace_labels is not None or p.pod_labels is not None,
        ),
    )


class NetworkPolicy(SpecModel):
    """Present: a NetworkPolicy admits only these peers (and the operator) to the pods."""

    allow_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the API (HTTP and gRPC ports); empty: nobody but the operator.",
    )
    operator_namespace: str = Field(
        default="pinnace-system",
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Namespace of the operator, whose pods load LoRA adapters over HTTP.",
    )


class LLMDeploymentSpec(SpecModel):
    """Desired state of one served model."""

    model: ModelSource
    replicas: int | None = Field(
        default=None, ge=0, le=1000, description="Fixed replica count (default 1)."
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale on LLM load instead of a fixed replica count."
    )
    image: str | None = Field(default=None, min_length=1, description="Runtime image override.")
    resources: Resources = Field(default_factory=Resources)
    engine: Engine = Field(default_factory=Engine)
    adapters: list[Adapter] = Field(default_factory=list, max_length=32)
    serving: Serving = Field(default_factory=Serving)
    storage: Storage = Field(default_factory=Storage)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    rollout: Rollout = Field(default_factory=Rollout)
    disruption_budget: DisruptionBudget = Field(default_factory=DisruptionBudget)
    network_policy: NetworkPolicy | None = Field(
        default=None, description="Restrict who may reach the pods (absent: no NetworkPolicy)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.adapters)"
            " || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "adapters: names must be unique",
            lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
        ),
        # An autoscaler owns the replica count; a second owner in git would fight it.
        Rule(
            "!has(self.replicas) || !has(self.autoscaling)",
            "replicas and autoscaling are mutually exclusive: remove replicas and let "
            "autoscaling.minReplicas/maxReplicas bound the count",
            lambda s: s.replicas is None or s.autoscaling is None,
        ),
        Rule(
            "!has(self.autoscaling) || self.autoscaling.minReplicas > 0"
            " || self.autoscaling.engine == 'keda'"
            " || (has(self.serving) && has(self.serving.kserve)"
            " && self.serving.kserve.deploymentMode == 'Serverless')",
            "autoscaling.minReplicas 0 (scale to zero) needs engine: keda or KServe Serverless",
            lambda s: (
                s.autoscaling is None
                or s.autoscaling.min_replicas > 0
                or s.autoscaling.engine == "keda"
                or s.serving.is_serverless
            ),
        ),
    )
