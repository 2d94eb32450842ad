"""`pinnace serve` arguments derived from the spec (flag names follow vLLM)."""

from __future__ import annotations

import json

from kubernetes.utils import parse_quantity

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import sources


def uses_storage_uris(llmd: LLMDeployment) -> bool:
    """KServe mode with adapters to fetch: every fetched URI goes into `storageUris`."""
    return llmd.spec.serving.is_kserve and any(
        not a.uri.startswith("file://") for a in llmd.spec.adapters
    )


def model_source(llmd: LLMDeployment) -> sources.Source:
    model = llmd.spec.model
    if llmd.spec.serving.is_kserve:
        # storageUris need one common root and no overlap: the model gets a folder of its own.
        mount = names.KSERVE_MODEL_DIR + ("/model" if uses_storage_uris(llmd) else "")
        return sources.resolve_kserve(model.uri, mount_path=mount, revision=model.revision)
    return sources.resolve(
        model.uri,
        slot="model",
        runtime_image=llmd.image,
        credentials=model.credentials_secret_ref,
        revision=model.revision,
    )


def draft_source(llmd: LLMDeployment) -> sources.Source | None:
    """speculative method draft_model: the draft's weights, delivered like the model's.

    KServe mode takes only file:// drafts (llmdeployment._kserve_errors refuses the rest).
    """
    speculative = llmd.spec.engine.speculative
    if speculative is None or speculative.model is None:
        return None
    if llmd.spec.serving.is_kserve:
        return sources.resolve_kserve(speculative.model, mount_path="")
    return sources.resolve(
        speculative.model,
        slot="draft",
        runtime_image=llmd.image,
        credentials=llmd.spec.model.credentials_secret_ref,
    )


def pod_sources(llmd: LLMDeployment) -> list[sources.Source]:
    """What a Deployment or LeaderWorkerSet pod mounts or downloads: the model, the draft."""
    draft = draft_source(llmd)
    return [model_source(llmd), *([draft] if draft is not None else [])]


def kserve_adapter_sources(llmd: LLMDeployment) -> list[tuple[str, sources.Source]]:
    """KServe mode: KServe fetches adapters with the model and pods start with them.

    (Deployment mode hot-loads adapters instead: see `render/adapters.py`.)
    """
    return [
        (
            a.name,
            sources.resolve_kserve(a.uri, mount_path=f"{names.KSERVE_MODEL_DIR}/adapters/{a.name}"),
        )
        for a in llmd.spec.adapters
    ]


def serves_grpc(llmd: LLMDeployment) -> bool:
    """gRPC beside HTTP, except under Knative (KServe Serverless), which routes one port."""
    return not llmd.spec.serving.is_serverless


def serve_args(llmd: LLMDeployment) -> list[str]:
    """Everything after `pinnace`: `serve MODEL_PATH --flag value ...`."""
    spec, engine = llmd.spec, llmd.spec.engine
    args = ["serve", model_source(llmd).path]
    args += ["--host", "0.0.0.0", "--port", str(spec.serving.port)]
    if serves_grpc(llmd):
        args += ["--grpc-port", str(names.GRPC_PORT)]
    args += ["--served-model-name", llmd.served_name, "--dtype", engine.dtype]
    # Drain in flight requests on SIGTERM within the pod's grace period (after preStop).
    args += ["--shutdown-timeout", str(names.SHUTDOWN_TIMEOUT_SECONDS)]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.max_num_seqs is not None:
        args += ["--max-num-seqs", str(engine.max_num_seqs)]
    prefix_caching = "enable" if engine.enable_prefix_caching else "no-enable"
    args.append(f"--{prefix_caching}-prefix-caching")
    if engine.quantization is not None:
        args += ["--quantization", engine.quantization]
    # Only where set: the default rolls no pods. A flag in extraArgs (the deprecated
    # spelling) stays where it is, so pods started before the field existed do not roll.
    if not engine.quantize_lm_head and engine.lm_head_flag is None:
        args.append("--no-quantize-lm-head")
    args += ["--kv-cache-dtype", engine.kv_cache_dtype]
    if engine.runner != "auto":  # auto is the runtime's default: pods need not roll
        args += ["--runner", engine.runner]
    if engine.speculative is not None:
        # vLLM's JSON keys (snake_case); unset fields keep the runtime's defaults.
        spec_config = engine.speculative.model_dump(exclude_none=True)
        draft = draft_source(llmd)
        if draft is not None:  # the draft's path in the pod, not its URI
            spec_config["model"] = draft.path
        args += ["--speculative-config", json.dumps(spec_config, separators=(",", ":"))]
    if spec.resources.gpu_count > 0:
        args += ["--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}"]
        args += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
        if engine.pipeline_parallel_size > 1:  # new flag: only where set, so no pod rolls
            args += ["--pipeline-parallel-size", str(engine.pipeline_parallel_size)]
    # A multi-node replica: every pod of the LeaderWorkerSet group runs these same args;
    # the runtime reads its rank, the group size and the leader's address from the
    # environment LeaderWorkerSet gives each pod (LWS_WORKER_INDEX, LWS_GROUP_SIZE,
    # LWS_LEADER_ADDRESS). Rank 0, the leader, also serves the API.
    if engine.kv_cache_memory is not None:
        args += ["--kv-cache-memory", str(int(parse_quantity(engine.kv_cache_memory)))]
    if llmd.lora_enabled:
        args.append("--enable-lora")
    if spec.serving.is_kserve and spec.adapters:
        args.append("--lora-modules")
        args += [f"{name}={source.path}" for name, source in kserve_adapter_sources(llmd)]
    # Deployment mode: no --lora-modules. The operator hot-loads adapters over HTTP, so the
    # list is not part of the pod spec and changing it never rolls pods.
    return args + list(engine.extra_args)
