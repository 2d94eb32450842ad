"""The `LLMDeployment` spec: one pydantic model that is both the parser and the CRD schema.

The CRD's openAPIV3Schema is generated from these classes (`crd.py`), so the two cannot
drift. This module holds what the model is, where it runs and how clients reach it, and
the top-level `LLMDeploymentSpec`; the rest is one module per concept: the building blocks
(`SpecModel`, `Rule`, value patterns) in spec_base.py and `spec.engine` in engine_spec.py
(both re-exported here), `spec.autoscaling` in autoscaling_spec.py, and how pods are
scheduled, replaced and reached in pod_policy_spec.py.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pinnace.operator.autoscaling_spec import Autoscaling
from pinnace.operator.engine_spec import DType, Engine, EnvVar, Quantization, Runner, Speculative
from pinnace.operator.pod_policy_spec import DisruptionBudget, NetworkPolicy, Rollout, Scheduling
from pinnace.operator.spec_base import (
    ADAPTER_NAME_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    DOWNLOAD_SCHEMES,
    MODEL_URI_PATTERN,
    PARAM_COUNT_PATTERN,
    QUANTITY_PATTERN,
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
