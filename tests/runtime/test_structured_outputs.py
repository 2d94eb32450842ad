"""Structured outputs on the real SmolLM2 through the OpenAI server: twenty JSON schemas
batched together all parse and validate; regex and choice hold with n > 1, streaming and
stop strings; the openai client's `chat.completions.parse` returns a pydantic object."""

from __future__ import annotations

import asyncio
import json
import re
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

# A sibling data module, read by path (tests are not a package).
SCHEMAS: list[tuple[str, dict[str, Any]]] = runpy.run_path(
    str(Path(__file__).with_name("json_schemas.py"))
)["SCHEMAS"]

pytestmark = pytest.mark.slow
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(smollm2_gguf: str, serve_app: Any) -> Iterator[Any]:
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings, build_app

    config = EngineConfig(model=smollm2_gguf, kv_cache_memory=128 * 2**20, max_model_len=1024)
    srv = serve_app(build_app(config, ServerSettings(served_model_names=[MODEL])))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def ask(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with JSON only: {what}."}]


def test_twenty_json_schemas_batched_all_validate(server: Any) -> None:
    async def run() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        calls = [
            aclient.chat.completions.create(
                model=MODEL,
                messages=ask(what),  # type: ignore[arg-type]
                response_format=schema_format(schema),  # type: ignore[arg-type]
                temperature=0,
                max_tokens=100,
            )
            for what, schema in SCHEMAS
        ]
        return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    assert len(replies) == len(SCHEMAS) == 20
    for (what, schema), reply in zip(SCHEMAS, replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (what, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_regex_choice_n_and_stop_strings(client: openai.OpenAI) -> None:
    pattern = r"[A-Z][a-z]{2,8} [0-9]{2}"
    regex = client.completions.create(
        model=MODEL,
        prompt="A name and an age:",
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    texts = [c.text for c in regex.choices]
    assert len(texts) == 3 and all(re.fullmatch(pattern, t) for t in texts), texts
    options = ["positive", "negative", "neutral"]
    choice = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Sentiment of 'I love this movie!'?"}],
        n=4,
        temperature=1.5,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": options}},
    )
    assert all(c.message.content in options for c in choice.choices)
    # A stop string inside the constrained text ends it there.
    stopped = client.completions.create(
        model=MODEL,
        prompt="A ticket code:",
        temperature=0,
        max_tokens=20,
        stop=["-"],
        extra_body={"structured_outputs": {"regex": r"[a-z]{3}-[0-9]{3}"}},
    )
    assert re.fullmatch(r"[a-z]{3}", stopped.choices[0].text)
    assert stopped.choices[0].stop_reason == "-"


def test_streamed_json_equals_the_whole_answer(client: openai.OpenAI) -> None:
    what, schema = SCHEMAS[9]  # nested objects in a bounded array
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=ask(what), response_format=schema_format(schema), temperature=0,
        max_tokens=100,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices
    ]
    assert len(pieces) > 5 and "".join(pieces) == whole
    jsonschema.validate(json.loads(whole or ""), schema)


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=50)


def test_openai_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_a_schema_that_cannot_compile_is_a_400_naming_it(client: openai.OpenAI) -> None:
    bad = {"type": "object", "properties": {"x": {"type": "string", "pattern": "[unclosed"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ask("x"),
            response_format=schema_format(bad),
            max_tokens=5,  # type: ignore[arg-type]
        )
    assert "response_format" in info.value.message and "JSON schema" in info.value.message
