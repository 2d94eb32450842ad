"""/v1/embeddings through the official openai client: float and base64 answers agree and
equal LLM.embed's vectors, one per input, with usage; bad requests are 400s naming the
parameter."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.server.app import ServerSettings, build_app

INPUTS = ["The quick brown fox", "jumps over the lazy dog, twice"]


@pytest.fixture(scope="module")
def served(
    make_tiny_model: Callable[[str], Path], serve_app: Callable[..., Any]
) -> Iterator[tuple[Any, LLMEngine]]:
    config = EngineConfig(
        model=str(make_tiny_model("Qwen2ForCausalLM")), dtype="float32", kv_cache_memory=2**24
    )
    engine = LLMEngine(config)
    server = serve_app(build_app(engine, ServerSettings(served_model_names=["tiny"])))
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
