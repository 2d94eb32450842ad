"""What the runtime (`pinnace serve`) runs, as far as the spec shows: the operator refuses
the rest (Degraded, reason RuntimeUnsupported) instead of rolling out pods that would only
crash-loop while the resource looks healthy.

Two kinds of refusal, mirroring the runtime's own:

- at start: `pinnace serve` checks its args before serving and exits 2 with one line
  (`serve.run`: `build_config`, the full EngineConfig validation); no parallel layout is
  refused there any more (pipeline stages and multi-node groups both run), so the
  RUNS_* flags below are True. tests/operator/test_runtime_args.py builds the runtime's
  config from every rendered pod's args and fails when the two disagree in either
  direction, so the flags below move with the runtime.
- at load: what tensor ranks do not shard and pipeline stages do not split
  (runtime/distributed/model_split.py `check_split_support`; for embeddings
  runtime/engine/engine_core.py `refuse_parallel_pooling`, as the engine core starts,
  before any rank does): checkpoint-quantized or GGUF weights, LoRA adapters, draft
  models, pooling models.

The LeaderWorkerSet renderer (render/leaderworkerset.py) renders multi-node groups, which
the runtime runs (runtime/executor/node.py for the pods other than the leader).
"""

from __future__ import annotations

from pinnace.operator.llmdeployment import LLMDeployment, SpecError

REASON = "RuntimeUnsupported"
# The runtime runs pipeline stages (pipeline_parallel_size > 1).
RUNS_PIPELINE_PARALLEL = True
# The runtime runs a group of ranks over several nodes (nnodes > 1: a LeaderWorkerSet).
RUNS_MULTI_NODE = True
# Quantizations that come with the checkpoint: their groups run along the dimension
# tensor parallelism splits.
_CHECKPOINT_QUANTIZATIONS = ("gptq", "awq", "gguf")


def start_refusals(llmd: LLMDeployment) -> list[str]:
    """What `pinnace serve` refuses from the rendered args alone, before loading."""
    engine, problems = llmd.spec.engine, []
    if engine.pipeline_parallel_size > 1 and not RUNS_PIPELINE_PARALLEL:
        problems.append(
            f"engine.pipelineParallelSize={engine.pipeline_parallel_size}: the runtime does "
            "not run pipeline parallelism yet (tensorParallelSize within one pod does)"
        )
    if llmd.is_multi_node and not RUNS_MULTI_NODE:
        problems.append(
            f"a replica on {engine.world_size} GPUs is a group of {llmd.group_size} pods of "
            f"resources.gpu.count={llmd.spec.resources.gpu_count}: the runtime does not run "
            "multi-node groups yet; fit the replica in one pod"
        )
    return problems


def load_refusals(llmd: LLMDeployment) -> list[str]:
    """What a tensor-parallel engine refuses when it loads the model."""
    spec, engine = llmd.spec, llmd.spec.engine
    if engine.world_size == 1:
        return []
    where = f"tensorParallelSize x pipelineParallelSize = {engine.world_size}"
    problems = []
    quantization = engine.quantization
    if quantization is None and spec.model.uri.endswith(".gguf"):
        quantization = "gguf"
    if quantization in _CHECKPOINT_QUANTIZATIONS:
        problems.append(
            f"engine.quantization {quantization} with {where}: the runtime does not split "
            "checkpoint-quantized weights across GPUs; use the float checkpoint with "
            "quantization int8 or fp8 (quantized after the split)"
        )
    if llmd.lora_enabled:
        problems.append(
            f"adapters and engine.enableLora with {where}: the runtime does not shard LoRA "
            "adapters across GPUs yet"
        )
    speculative = engine.speculative
    if speculative is not None and speculative.method == "draft_model":
        problems.append(
            f"engine.speculative method draft_model with {where}: the runtime does not "
            "split a draft model across GPUs; use method ngram"
        )
    if engine.runner == "pooling":
        problems.append(
            f"engine.runner pooling with {where}: the runtime does not compute embeddings "
            "across GPUs yet"
        )
    return problems


def check_runtime_support(llmd: LLMDeployment) -> None:
    """Raise SpecError(reason=RuntimeUnsupported) for what the runtime would refuse."""
    problems = start_refusals(llmd) + load_refusals(llmd)
    if problems:
        raise SpecError("; ".join(problems), reason=REASON)
