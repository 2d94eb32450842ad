"""How one replica's GPUs split over pods, and what a multi-node replica cannot do.

A replica runs on `tensorParallelSize x pipelineParallelSize` GPUs (its ranks, one GPU
each). Within one pod's `resources.gpu.count` it is a Deployment pod; beyond it, a
LeaderWorkerSet group of `ranks / gpu.count` pods, every pod running as many ranks:

    tensorParallelSize 8 x pipelineParallelSize 2 = 16 ranks, gpu.count 8
      -> group of 2 pods: leader (API server, ranks 0-7), worker (ranks 8-15)

Each message says what to change; `parse_llmdeployment` joins them into one SpecError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pinnace.operator.llmdeployment import LLMDeployment

RANKS = "engine.tensorParallelSize x engine.pipelineParallelSize"


def parallel_errors(llmd: LLMDeployment) -> list[str]:
    world, gpus = llmd.spec.engine.world_size, llmd.spec.resources.gpu_count
    if world == 1:
        return []
    if gpus == 0:
        return [f"{RANKS} = {world} ranks need GPUs, one per rank: set resources.gpu.count"]
    if world < gpus:
        return [
            f"{RANKS} = {world} GPUs per replica, but resources.gpu.count={gpus}: set "
            f"gpu.count to {world} (one pod) or to a divisor of {world} (a group of pods)"
        ]
    if world % gpus:
        return [
            f"{RANKS} = {world} GPUs do not split evenly over pods of resources.gpu.count="
            f"{gpus}: use a gpu.count that divides {world}"
        ]
    return _multi_node_errors(llmd) if llmd.is_multi_node else []


def _multi_node_errors(llmd: LLMDeployment) -> list[str]:
    spec, problems = llmd.spec, []
    group = f"a replica on {spec.engine.world_size} GPUs is a group of {llmd.group_size} pods"
    if spec.serving.is_kserve:
        problems.append(
            f"serving.mode KServe runs one pod per replica, but {group}: use serving.mode "
            "Deployment (the operator runs a LeaderWorkerSet), or fit the replica in one pod"
        )
    if llmd.lora_enabled:
        problems.append(
            f"adapters and engine.enableLora need one pod per replica, but {group}: LoRA "
            "is not supported on multi-node replicas yet"
        )
    cache = spec.storage.cache
    if cache is not None and cache.size is not None and cache.access_mode != "ReadWriteMany":
        problems.append(
            f"storage.cache.accessMode {cache.access_mode}: {group} on different nodes, "
            "which all mount the cache: use ReadWriteMany"
        )
    if spec.rollout.strategy == "Recreate":
        problems.append(
            f"rollout.strategy Recreate: {group}, and a LeaderWorkerSet replaces groups by "
            "rolling update only: use maxSurge 0 and maxUnavailable 1 where GPUs are scarce"
        )
    return problems
