"""KServe bodies: V2 / Open Inference Protocol REST, its generate extension, and V1.

Field names follow `predict-api-v2/rest_predict_v2.yaml` of KServe; the text model
takes a BYTES tensor `text_input` and answers a BYTES tensor `text_output`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pinnace.runtime.server.openai_protocol import INT64, PromptLogprob, RequestModel

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"


class KServeParameters(RequestModel):
    """Settings a KServe request may carry: SamplingParams' names and defaults (max_tokens
    16, as /v1/completions), and whether to apply the chat template."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The sampler's processors (issue 12), with SamplingParams' names.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    best_of: int | None = None  # sample this many, answer the best by cumulative logprob
    prompt_logprobs: int | None = None  # generate and generate_stream answer them
    # None: wrap the text as a user message when the model has a chat template.
    apply_chat_template: bool | None = None


class V2RequestInput(RequestModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class V2RequestOutput(RequestModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(RequestModel):
    id: str | None = None
    # KServe's SDK repeats the path's model in the body; the path decides which model runs.
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    # A binary output has no `data`: `parameters.binary_data_size` counts its bytes instead.
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2ResponseOutput]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2GenerateRequest(BaseModel):
    """Triton's generate extension: sampling keys go in `parameters` or at the top level."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    id: str | None = None
    text_input: str
    parameters: dict[str, Any] | None = None

    def sampling_values(self) -> dict[str, Any]:
        return {**(self.parameters or {}), **(self.model_extra or {})}


class V2GenerateResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    text_output: str
    finish_reason: str | None = None
    # With parameters.prompt_logprobs: OpenAI completions' (vLLM's) prompt_logprobs list.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class V1Instance(RequestModel):
    """An instance with its own settings; unset ones come from the request's parameters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str


class V1PredictRequest(RequestModel):
    instances: list[str | V1Instance]
    parameters: dict[str, Any] | None = None


class V1PredictResponse(BaseModel):
    predictions: list[str]
