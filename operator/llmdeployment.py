"""A parsed `LLMDeployment`: metadata + validated spec, and the checks no schema can make.

`parse_llmdeployment(body)` is the single entry for the operator and `pinnace render`;
any problem becomes one `SpecError` whose one-line message is what the user sees (CLI
error line, `Degraded` condition message).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pinnace.operator import names
from pinnace.operator.engine_spec import LM_HEAD_FLAGS, LM_HEAD_IN_FLOATS_NEEDS, Engine
from pinnace.operator.parallel_checks import parallel_errors
from pinnace.operator.spec import Adapter, LLMDeploymentSpec, Rule

# Flags the operator derives from the spec; setting them in extraArgs would silently fight
# the operator (or break the probes), so they are refused with a pointer to the right field.
# Not LM_HEAD_FLAGS: they worked in extraArgs before engine.quantizeLmHead existed, so they
# are honoured there (deprecated) rather than breaking resources on an operator upgrade.
MANAGED_FLAGS: dict[str, str] = {
    "--host": "the operator binds 0.0.0.0",
    "--port": "use serving.port",
    "--served-model-name": "use model.servedName",
    "--dtype": "use engine.dtype",
    "--max-model-len": "use engine.maxModelLen",
    "--max-num-seqs": "use engine.maxNumSeqs",
    "--gpu-memory-utilization": "use engine.gpuMemoryUtilization",
    "--enable-prefix-caching": "use engine.enablePrefixCaching",
    "--no-enable-prefix-caching": "use engine.enablePrefixCaching",
    "--quantization": "use engine.quantization",
    "--kv-cache-dtype": "use engine.kvCacheDtype",
    "--runner": "use engine.runner",
    "--task": "use engine.runner",
    "--convert": "use engine.runner",
    "--tensor-parallel-size": "use engine.tensorParallelSize",
    "-tp": "use engine.tensorParallelSize",
    "--pipeline-parallel-size": "use engine.pipelineParallelSize",
    "-pp": "use engine.pipelineParallelSize",
    "--nnodes": "a replica's pods follow from engine and resources.gpu.count",
    "--node-rank": "each pod of a LeaderWorkerSet group takes its rank from the group",
    "--master-addr": "each pod of a LeaderWorkerSet group finds its leader from the group",
    "--master-port": "the runtime's default rendezvous port is used",
    "--speculative-config": "use engine.speculative",
    "--kv-cache-memory": "use engine.kvCacheMemory",
    "--enable-lora": "use adapters or engine.enableLora",
    "--lora-modules": "use adapters (the operator hot-loads them)",
    "--api-key": "use serving.apiKeySecretRef",
    "--grpc-port": f"gRPC is served on port {names.GRPC_PORT}",
    "--shutdown-timeout": "it is set to fit the pod's termination grace period",
}
# Environment the operator sets itself (cache location, API key).
RESERVED_ENV = frozenset({"PINNACE_API_KEY", "HF_HOME", "HOME", "TMPDIR", "PYTHONUNBUFFERED"})

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Children are named after the resource and a Service name must be a DNS-1035 label.
METADATA_NAME_RULE = Rule(
    "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "metadata.name must be a DNS-1035 label (lowercase letters, digits, '-', starting with "
    "a letter, at most 63 characters) because it names the Service",
    lambda body: (
        bool(_DNS_1035.match(str(body.get("metadata", {}).get("name", ""))))
        and len(body["metadata"]["name"]) <= 63
    ),
)


class SpecError(ValueError):
    """The resource cannot be rolled out as is; retrying will not help until the user edits
    it, unless `retryable` (the cluster lacks something an admin can add)."""

    def __init__(
        self, message: str, *, reason: str = "InvalidSpec", retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.reason = reason  # the Degraded condition's reason
        self.retryable = retryable


@dataclass(frozen=True)
class LLMDeployment:
    name: str
    namespace: str
    spec: LLMDeploymentSpec
    generation: int | None = None
    uid: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.name

    @property
    def image(self) -> str:
        return self.spec.image or names.DEFAULT_IMAGE

    @property
    def lora_enabled(self) -> bool:
        """The runtime reserves LoRA slots: adapters are declared, or asked for up front."""
        return bool(self.spec.adapters) or self.spec.engine.enable_lora

    @property
    def group_size(self) -> int:
        """Pods per replica: 1, or a LeaderWorkerSet group when the replica's GPUs
        (tensor x pipeline parallel) exceed one pod's `resources.gpu.count`."""
        gpus, world = self.spec.resources.gpu_count, self.spec.engine.world_size
        if gpus == 0 or world <= gpus:
            return 1
        return -(-world // gpus)  # parse refuses a world that pods do not split evenly

    @property
    def is_multi_node(self) -> bool:
        return self.group_size > 1

    @property
    def cache_claim(self) -> str | None:
        """The weights cache PVC every runtime pod mounts, if the spec asks for one."""
        cache = self.spec.storage.cache
        if cache is None:
            return None
        return cache.claim_name or f"{self.name}-cache"

    @property
    def max_replicas(self) -> int:
        """The most replicas that may run at once (fixed count or autoscaling bound)."""
        scaling = self.spec.autoscaling
        return scaling.max_replicas if scaling is not None else self.replicas or 0

    @property
    def wants_disruption_budget(self) -> bool:
        enabled = self.spec.disruption_budget.enabled
        return self.max_replicas > 1 if enabled is None else enabled

    @property
    def replicas(self) -> int | None:
        """The fixed replica count, or None when an autoscaler owns it."""
        if self.spec.autoscaling is not None:
            return None
        return 1 if self.spec.replicas is None else self.spec.replicas


def parse_llmdeployment(body: Mapping[str, Any]) -> LLMDeployment:
    """Validate a whole `LLMDeployment` object (as from the API or a YAML file)."""
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if kind is not None and (kind, api_version) != (names.KIND, names.API_VERSION):
        expected = f"{names.KIND} ({names.API_VERSION})"
        raise SpecError(f"expected kind {expected}, got {kind} ({api_version})")
    meta = body.get("metadata") or {}
    if not METADATA_NAME_RULE.check(body):
        raise SpecError(METADATA_NAME_RULE.message)
    try:
        spec = LLMDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None
    llmd = LLMDeployment(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        spec=spec,
        generation=meta.get("generation"),
        uid=meta.get("uid"),
        annotations=dict(meta.get("annotations") or {}),
    )
    problems = semantic_errors(llmd)
    if problems:
        raise SpecError("; ".join(problems))
    return llmd


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: `spec.engine.dtype: Input should be ...; ...`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ("spec", *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def semantic_errors(llmd: LLMDeployment) -> list[str]:
    """Checks that need more than one field, defaults, or operator knowledge."""
    spec, problems = llmd.spec, []
    engine, gpus = spec.engine, spec.resources.gpu_count
    if spec.serving.port == names.GRPC_PORT and not spec.serving.is_serverless:
        problems.append(f"serving.port {names.GRPC_PORT} is the runtime's gRPC port; pick another")
    clash = [a.name for a in spec.adapters if a.name == llmd.served_name]
    if clash:
        problems.append(f"adapters: name {clash[0]!r} clashes with the served model name")
    if engine.kv_cache_memory is not None and gpus > 0:
        problems.append(
            "engine.kvCacheMemory is the CPU KV budget; with GPUs use engine.gpuMemoryUtilization"
        )
    if engine.runner == "pooling" and spec.adapters:
        problems.append(
            "adapters: LoRA adapters generate text; engine.runner pooling serves embeddings "
            "of the base model only"
        )
    for arg in engine.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            hint = MANAGED_FLAGS[flag]
            problems.append(f"engine.extraArgs: {flag} is set by the operator; {hint}")
    for var in engine.env:
        if var.name in RESERVED_ENV:
            problems.append(f"engine.env: {var.name} is set by the operator")
    return (
        problems
        + _lm_head_flag_errors(engine)
        + parallel_errors(llmd)
        + _adapter_errors(llmd)
        + _autoscaling_errors(llmd)
        + _kserve_errors(llmd)
    )


def _lm_head_flag_errors(engine: Engine) -> list[str]:
    """The deprecated extraArgs spelling of quantizeLmHead, refused where the field would be
    (the runtime refuses it at start) or where it contradicts the field."""
    flag = engine.lm_head_flag
    if flag == LM_HEAD_FLAGS[0] and not engine.quantize_lm_head:
        return [
            f"engine.extraArgs: {flag} contradicts engine.quantizeLmHead false; remove the "
            "flag (deprecated: engine.quantizeLmHead replaces it)"
        ]
    if flag == LM_HEAD_FLAGS[1] and engine.quantization not in ("int8", "fp8"):
        return [
            f"engine.extraArgs: {flag} (quantizeLmHead false) {LM_HEAD_IN_FLOATS_NEEDS}: set "
            "one of them, or remove the flag"
        ]
    return []


def deprecations(llmd: LLMDeployment) -> list[str]:
    """Spellings that still work but should move to a field (a Warning for the user)."""
    present = [f for f in LM_HEAD_FLAGS if f in llmd.spec.engine.extra_args]
    hint = {
        LM_HEAD_FLAGS[0]: "it is the default (engine.quantizeLmHead true): remove it",
        LM_HEAD_FLAGS[1]: "set engine.quantizeLmHead: false instead",
    }
    return [f"engine.extraArgs: {flag} is deprecated; {hint[flag]}" for flag in present]


def is_fetched(llmd: LLMDeployment, adapter: Adapter) -> bool:
    """Deployment mode: the adapter is copied into the cache by a Job before pods load it.

    Pods load an adapter straight from a path they already have (file://, or pvc:// on a
    claim every pod mounts anyway); anything else would need a new volume or init
    container, i.e. a rollout, so it is fetched into the shared cache instead.
    """
    scheme, _, rest = adapter.uri.partition("://")
    if scheme == "file":
        return False
    if scheme == "pvc":
        claim = rest.partition("/")[0]
        model_claim = _pvc_claim(llmd.spec.model.uri)
        return claim not in (llmd.cache_claim, model_claim)
    return True


def _pvc_claim(uri: str) -> str | None:
    return uri.removeprefix("pvc://").partition("/")[0] if uri.startswith("pvc://") else None


def _adapter_errors(llmd: LLMDeployment) -> list[str]:
    if llmd.spec.serving.is_kserve:
        return []  # KServe's storage initializer fetches adapters with the model
    fetched = [a for a in llmd.spec.adapters if is_fetched(llmd, a)]
    cache = llmd.spec.storage.cache
    if not fetched:
        return []
    if cache is None:
        return [
            f"adapters: {fetched[0].name} ({fetched[0].uri}) is fetched once into storage.cache, "
            "where running pods can load it without a restart: set storage.cache (ReadWriteMany "
            "for more than one replica), or use a file:// path or a pvc:// on the model's claim"
        ]
    if cache.access_mode == "ReadWriteOncePod":
        return [
            "storage.cache.accessMode ReadWriteOncePod leaves no access for the Job that fetches "
            f"adapter {fetched[0].name}: use ReadWriteMany (or ReadWriteOnce on a single node)"
        ]
    return []


def _autoscaling_errors(llmd: LLMDeployment) -> list[str]:
    scaling, problems = llmd.spec.autoscaling, []
    if scaling is None:
        return []
    metrics = scaling.scaling_metrics
    for m in metrics:
        if m.metric == "kvCacheUsage" and m.target is not None and m.target > 1:
            problems.append("autoscaling: the kvCacheUsage target is a fraction (0 < target <= 1)")
        if m.metric == "cpu" and m.target is not None and m.target != int(m.target):
            problems.append("autoscaling: the cpu target is a whole percent of the CPU request")
    if any(m.metric == "cpu" for m in metrics) and llmd.spec.resources.cpu is None:
        problems.append(
            "autoscaling: metric cpu needs resources.cpu (utilization is of the request)"
        )
    if scaling.min_replicas == 0 and all(m.metric == "cpu" for m in metrics):
        problems.append("autoscaling: scaling to zero needs a metric other than cpu")
    return problems


def _kserve_errors(llmd: LLMDeployment) -> list[str]:
    """What KServe cannot express; each message says what to use instead."""
    spec, problems = llmd.spec, []
    if not spec.serving.is_kserve:
        return []
    if spec.model.credentials_secret_ref is not None:
        problems.append(
            "model.credentialsSecretRef is not used in KServe mode: KServe's storage initializer "
            "reads credentials from serving.kserve.serviceAccountName's Secrets"
        )
    if spec.storage.cache is not None:
        problems.append("storage.cache does not apply in KServe mode (KServe downloads per pod)")
    draft = spec.engine.speculative.model if spec.engine.speculative else None
    if draft is not None and not draft.startswith("file://"):
        problems.append(
            f"engine.speculative.model {draft}: KServe mode fetches only the model and its "
            "adapters, not a draft model; use a file:// draft baked into the image, method "
            "ngram, or serving.mode Deployment"
        )
    for field_, set_ in (
        ("rollout", spec.rollout != spec.rollout.__class__()),
        ("disruptionBudget", spec.disruption_budget.enabled is not None),
        ("networkPolicy", spec.network_policy is not None),
    ):
        if set_:
            problems.append(f"{field_} applies only in Deployment mode (KServe runs the pods)")
    if llmd.replicas == 0:
        problems.append("replicas 0 is not supported in KServe mode; delete the resource instead")
    scaling = spec.autoscaling
    if scaling is None:
        return problems
    names_ = {m.metric for m in scaling.scaling_metrics}
    if spec.serving.is_serverless:
        if scaling.engine == "keda":
            problems.append("autoscaling.engine keda needs KServe deploymentMode RawDeployment")
        if names_ != {"requestsRunning"}:
            problems.append(
                "KServe Serverless scales on in-flight requests only: use metric "
                "requestsRunning, or deploymentMode RawDeployment with engine keda"
            )
    elif scaling.engine == "hpa" and names_ != {"cpu"}:
        problems.append(
            "KServe's HPA autoscaler scales on cpu only: use autoscaling.engine keda "
            "for requestsWaiting, kvCacheUsage or requestsRunning"
        )
    return problems
