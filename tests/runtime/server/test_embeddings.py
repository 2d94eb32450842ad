"""/v1/embeddings through the official openai client on a --runner pooling server: float
and base64 answers agree and equal LLM.embed's vectors, one per input, with usage; bad
requests are 400s naming the parameter. Each runner's server answers the other's endpoints
with a 404 in the route's error shape (OpenAI or KServe) naming the runner to start; KServe
V2 infer on a pooling server (REST and gRPC) answers an FP32 `embedding` tensor. The same
with the engine core in its own process, as `pinnace serve --runner pooling` runs."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton_grpc

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.server.app import ServerSettings, build_app

INPUTS = ["The quick brown fox", "jumps over the lazy dog, twice"]


@pytest.fixture(scope="module")
def served(
    make_tiny_model: Callable[[str], Path], serve_app: Callable[..., Any]
) -> Iterator[tuple[Any, LLMEngine]]:
    config = EngineConfig(
        model=str(make_tiny_model("Qwen2ForCausalLM")),
        dtype="float32",
        kv_cache_memory=2**24,
        runner="pooling",
    )
    engine = LLMEngine(config)  # the reference; the server's core runs in its own process
    server = serve_app(build_app(config, ServerSettings(served_model_names=["tiny"])))
    yield server, engine
    server.stop()


def test_openai_client_embeddings(served: tuple[Any, LLMEngine]) -> None:
    server, engine = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    floats = client.embeddings.create(model="tiny", input=INPUTS, encoding_format="float")
    # Unasked, the client requests base64 and decodes it to floats itself; asked for base64
    # it hands the strings back.
    implicit = client.embeddings.create(model="tiny", input=INPUTS)
    packed = client.embeddings.create(model="tiny", input=INPUTS, encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1]
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_array_equal(got, np.array([d.embedding for d in implicit.data]))
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in packed.data]
    np.testing.assert_array_equal(got, np.array(decoded))
    expected = np.array([o.outputs.embedding for o in engine.embed(list(INPUTS))])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    num_tokens = sum(len(engine.tokenize(t)) for t in INPUTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == num_tokens
    assert floats.model == "tiny"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": "hi", "dimensions": 16}, "dimensions"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": [[10**9]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),  # past OpenAI's 2048 inputs per request
    ],
)
def test_bad_requests_are_400s(
    served: tuple[Any, LLMEngine], body: dict[str, Any], param: str
) -> None:
    server, _ = served
    with server.client() as http:
        response = http.post("/v1/embeddings", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_pooling_server_refuses_generation(served: tuple[Any, LLMEngine]) -> None:
    server, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match=r"--runner pooling.*--runner generate"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not serve text generation"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    with server.client() as http:
        v1 = http.post("/v1/models/tiny:predict", json={"instances": ["hi"]})
        generate = http.post("/v2/models/tiny/generate", json={"text_input": "hi"})
        models = http.get("/v1/models")
    for response in (v1, generate):  # KServe's error shape on KServe routes
        assert response.status_code == 404
        assert "--runner generate" in response.json()["error"]
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


def test_kserve_v2_infer_answers_embeddings(served: tuple[Any, LLMEngine]) -> None:
    server, engine = served
    tensor = {"name": "text_input", "shape": [2], "datatype": "BYTES", "data": list(INPUTS)}
    with server.client() as http:
        answer = http.post("/v2/models/tiny/infer", json={"id": "7", "inputs": [tensor]})
        metadata = http.get("/v2/models/tiny").json()
        wrong = http.post(
            "/v2/models/tiny/infer", json={"inputs": [tensor], "outputs": [{"name": "text_output"}]}
        )
        many = {"name": "text_input", "shape": [2049], "datatype": "BYTES", "data": ["x"] * 2049}
        too_many = http.post("/v2/models/tiny/infer", json={"inputs": [many]})
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    hidden = engine.model_config.hidden_size
    assert (output["name"], output["datatype"], output["shape"]) == (
        "embedding",
        "FP32",
        [2, hidden],
    )
    expected = np.array([o.outputs.embedding for o in engine.embed(list(INPUTS))])
    got = np.array(output["data"], dtype=np.float32).reshape(2, hidden)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert answer.json()["id"] == "7"
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, hidden]}]
    assert wrong.status_code == 400 and "'embedding'" in wrong.json()["error"]
    assert too_many.status_code == 400 and "at most 2048" in too_many.json()["error"]


def test_generate_server_refuses_embeddings(
    make_tiny_model: Callable[[str], Path], serve_app: Callable[..., Any]
) -> None:
    config = EngineConfig(
        model=str(make_tiny_model("Qwen2ForCausalLM")), dtype="float32", kv_cache_memory=2**24
    )
    engine = LLMEngine(config)  # runner auto: a causal LM generates
    server = serve_app(build_app(engine, ServerSettings(served_model_names=["tiny"])))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError, match=r"--runner generate.*--runner pooling"):
            client.embeddings.create(model="tiny", input="hi")
        reply = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        server.stop()


def test_pooling_server_with_its_core_in_a_process(
    served: tuple[Any, LLMEngine],
    start_server: Callable[..., Any],
    make_tiny_model: Callable[[str], Path],
) -> None:
    """As `pinnace serve --runner pooling --grpc-port ...` runs it: the engine core in its
    own process; the openai client and Triton's gRPC client get the same vectors."""
    _, engine = served
    grpc_settings = {"grpc_port": 0, "grpc_host": "127.0.0.1"}
    model = make_tiny_model("Qwen2ForCausalLM")
    server = start_server(model, settings=grpc_settings, dtype="float32", runner="pooling")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        got = client.embeddings.create(model="tiny", input=INPUTS, encoding_format="float")
        expected = np.array([o.outputs.embedding for o in engine.embed(list(INPUTS))])
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(openai.NotFoundError, match="--runner pooling"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.app.state.grpc_port}")
        hidden = engine.model_config.hidden_size
        outputs = triton.get_model_metadata("tiny").outputs
        assert [(t.name, t.datatype, list(t.shape)) for t in outputs] == [
            ("embedding", "FP32", [-1, hidden])
        ]
        text = triton_grpc.InferInput("text_input", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in INPUTS], dtype=object))
        answer = triton.infer("tiny", [text]).as_numpy("embedding")
        assert answer.shape == (2, hidden)
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
        triton.close()
    finally:
        server.stop()
