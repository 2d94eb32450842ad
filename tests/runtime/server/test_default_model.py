"""The issue's three curl commands against the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pinnace.cli.serve import default_served_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_gguf: str, serve_app: Any) -> Iterator[Any]:
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.engine.llm_engine import LLMEngine
    from pinnace.runtime.server.app import ServerSettings, build_app

    # GGUF support is a runtime dependency: an ImportError here is a failure, not a skip.
    engine = LLMEngine(EngineConfig(model=smollm2_gguf, kv_cache_memory=64 * 2**20))
    name = default_served_name(smollm2_gguf)
    app = build_app(engine, ServerSettings(served_model_names=[name]))
    srv = serve_app(app)
    yield srv
    srv.stop()


def test_default_served_name_matches_the_issue(smollm2_gguf: str) -> None:
    assert default_served_name(smollm2_gguf) == "SmolLM2-135M-Instruct"


def test_issue_commands(server: Any) -> None:
    name = "SmolLM2-135M-Instruct"
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [name]
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "max_tokens": 24}  # fmt: skip
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        reply = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert reply.strip()
        question = "What is the capital of France?"
        tensor = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [question]}
        infer = http.post(
            f"/v2/models/{name}/infer",
            json={"inputs": [tensor], "parameters": {"temperature": 0, "max_tokens": 16}},
        )
        assert infer.status_code == 200, infer.text
        assert "Paris" in infer.json()["outputs"][0]["data"][0]
