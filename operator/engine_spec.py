"""`spec.engine`: the runtime's settings, each rendered as one `pinnace serve` flag, and how
the model is split over GPUs (tensor and pipeline parallelism)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pinnace.operator.spec_base import (
    ENV_NAME_PATTERN,
    MODEL_URI_PATTERN,
    QUANTITY_PATTERN,
    Quantity,
    Rule,
    SpecModel,
)


class EnvVar(SpecModel):
    """An environment variable for the runtime container."""

    name: str = Field(pattern=ENV_NAME_PATTERN, max_length=256)
    value: str = ""


DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["int8", "fp8", "gptq", "awq", "gguf"]
Runner = Literal["auto", "generate", "pooling"]
# The runtime's flag for quantizeLmHead, first true then false. Before the field existed
# users passed it in extraArgs; that spelling is still honoured (deprecated), see
# `Engine.lm_head_flag`.
LM_HEAD_FLAGS = ("--quantize-lm-head", "--no-quantize-lm-head")
LM_HEAD_IN_FLOATS_NEEDS = "applies only to quantization int8 or fp8 (quantized at load)"


class Speculative(SpecModel):
    """Speculative decoding, rendered as `--speculative-config` (vLLM's speculative_config)."""

    method: Literal["ngram", "draft_model"] = Field(
        default="ngram",
        description="ngram: propose the tokens that followed the latest n tokens earlier in "
        "the prompt or output (prompt lookup). draft_model: a smaller model with the "
        "target's tokenizer proposes them (set model).",
    )
    model: str | None = Field(
        default=None,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="draft_model: the draft's weights, with the schemes of spec.model.uri "
        "(hf://, pvc://, s3://, gs://, file://); fetched or mounted like the model, with "
        "spec.model.credentialsSecretRef.",
    )
    num_speculative_tokens: int = Field(ge=1, le=16, description="Tokens proposed per step.")
    prompt_lookup_min: int | None = Field(default=None, ge=1, le=64)
    prompt_lookup_max: int | None = Field(default=None, ge=1, le=64)
    disable_by_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="No proposals in steps where more requests than this sample (a large "
        "batch is compute-bound); unset: the runtime's default (8).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.method) || self.method != 'draft_model' || has(self.model)",
            "method draft_model needs model (the draft's URI)",
            lambda s: s.method != "draft_model" or s.model is not None,
        ),
        Rule(
            "!has(self.model) || (has(self.method) && self.method == 'draft_model')",
            "model is only for method draft_model",
            lambda s: s.model is None or s.method == "draft_model",
        ),
        Rule(
            "(has(self.method) && self.method == 'draft_model') ? "
            "!has(self.promptLookupMin) && !has(self.promptLookupMax) : true",
            "promptLookupMin and promptLookupMax are only for method ngram",
            lambda s: (
                s.method != "draft_model"
                or (s.prompt_lookup_min is None and s.prompt_lookup_max is None)
            ),
        ),
        Rule(
            "!has(self.promptLookupMin) || !has(self.promptLookupMax) || "
            "self.promptLookupMin <= self.promptLookupMax",
            "promptLookupMin must not exceed promptLookupMax",
            lambda s: (
                s.prompt_lookup_min is None
                or s.prompt_lookup_max is None
                or s.prompt_lookup_min <= s.prompt_lookup_max
            ),
        ),
    )


class Engine(SpecModel):
    """Runtime settings; each maps to one `pinnace serve` flag."""

    max_model_len: int | None = Field(default=None, ge=16, le=1_048_576)
    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    dtype: DType = "auto"
    quantization: Quantization | None = None
    quantize_lm_head: bool = Field(
        default=True,
        description="quantization int8 / fp8: also quantize the LM head and the token "
        "embedding (the runtime's default). false keeps them in the model dtype, as vLLM "
        "does: more weight bytes, closer to the float model's output.",
    )
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    runner: Runner = Field(
        default="auto",
        description="What the model serves (vLLM's --runner): generate (completions, chat, "
        "KServe inference) or pooling (/v1/embeddings); auto decides from the checkpoint "
        "(sentence-transformers folders and *Model architectures pool).",
    )
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs that share each layer (vLLM's tensor_parallel_size).",
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Stages the layers are split into (vLLM's pipeline_parallel_size). "
        "tensorParallelSize x pipelineParallelSize GPUs serve one replica: when that is more "
        "than resources.gpu.count, each replica is a LeaderWorkerSet group of "
        "(tensorParallelSize x pipelineParallelSize) / gpu.count pods.",
    )
    kv_cache_memory: Quantity | None = Field(
        default=None, pattern=QUANTITY_PATTERN, description="KV cache budget on CPU (e.g. 2Gi)."
    )
    enable_lora: bool = Field(
        default=False,
        description="Reserve LoRA slots even with no adapters declared, so adding the first "
        "adapter or removing the last one hot-loads instead of restarting pods.",
    )
    speculative: Speculative | None = Field(
        default=None, description="Speculative decoding; off when absent."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    extra_args: list[str] = Field(default_factory=list, max_length=64)

    # The runtime refuses the combination at start: the pod would crash-loop.
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.quantizeLmHead) || self.quantizeLmHead"
            " || (has(self.quantization) && self.quantization in ['int8', 'fp8'])",
            f"quantizeLmHead false {LM_HEAD_IN_FLOATS_NEEDS}: set one of them, or remove "
            "quantizeLmHead",
            lambda e: e.quantize_lm_head or e.quantization in ("int8", "fp8"),
        ),
    )

    @property
    def lm_head_flag(self) -> str | None:
        """The deprecated spelling: the last of LM_HEAD_FLAGS in extraArgs (the runtime's
        parser takes the last), or None."""
        return next((a for a in reversed(self.extra_args) if a in LM_HEAD_FLAGS), None)

    @property
    def effective_quantize_lm_head(self) -> bool:
        """quantizeLmHead as the pods run it: the extraArgs spelling where there is one.

        The API server fills in the field's default (true), so a true field cannot be told
        from an unset one: only false contradicts a flag (llmdeployment refuses that).
        """
        flag = self.lm_head_flag
        return self.quantize_lm_head if flag is None else flag == LM_HEAD_FLAGS[0]

    @property
    def world_size(self) -> int:
        """GPUs (ranks) one replica runs on: tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
