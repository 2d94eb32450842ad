"""Bad input gets a clear 400/404 and loses nothing; a schema-driven fuzz finds no 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny"
MAX_MODEL_LEN = 64
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_model_len": MAX_MODEL_LEN}


def still_serving(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    resp = http.post(COMPLETIONS, json=body)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        (COMPLETIONS, b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
        (COMPLETIONS, b"[1, 2]", 400, "JSON object"),
        (COMPLETIONS, {"model": MODEL}, 400, "prompt: Field required"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        (COMPLETIONS, {"prompt": {"a": 1}}, 400, "prompt"),
        (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        (COMPLETIONS, {"prompt": "word " * 100}, 400, "maximum context length"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n must be at least 1"),
        (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
        (COMPLETIONS, {"prompt": [], "max_tokens": 1}, 400, "prompt must not be empty"),
        (COMPLETIONS, {"prompt": [[]], "max_tokens": 1}, 400, "prompt is empty"),
        (COMPLETIONS, {"prompt": [10**9]}, 400, "out of vocabulary"),
        (COMPLETIONS, {"prompt": "x", "seed": 2**70}, 400, "seed"),
        (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
        (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream"),
        (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
        (CHAT, {"model": MODEL, "messages": []}, 400, "messages must not be empty"),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        (CHAT, {"messages": "Hi"}, 400, "messages"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": -1}, 400, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
        (CHAT, {"model": "nope", "messages": MESSAGES}, 404, "does not exist"),
        ("/no/such/route", {}, 404, "no route"),
    ],
)
def test_bad_request_is_answered_clearly(
    http: httpx.Client, path: str, body: Any, status: int, needle: str
) -> None:
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert needle in error["message"]
    still_serving(http)


def test_nan_and_infinity_are_rejected(http: httpx.Client) -> None:
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}'):
        resp = http.post(COMPLETIONS, content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
    still_serving(http)


# -- fuzz: request bodies drawn from our own OpenAPI document ------------------------------

JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
# Field hints keep most requests valid enough to reach the engine.
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([MODEL, MODEL, "other", ""]),
    "max_tokens": st.integers(-2, MAX_MODEL_LEN + 2),
    "max_completion_tokens": st.integers(-2, MAX_MODEL_LEN + 2),
    "n": st.integers(-1, 6),
    "logprobs": st.integers(-1, 25) | st.booleans(),
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 60_000), max_size=12),
    "text_input": st.text(max_size=40),
}


def from_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    """A hypothesis strategy for values of a JSON schema (the subset FastAPI emits)."""
    if depth > 5:
        return st.none()
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, depth + 1) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))

        def field(name: str, sub: dict[str, Any]) -> Any:
            valid = HINTS[name] if name in HINTS else from_schema(sub, defs, depth + 1)
            return st.one_of(valid, valid, valid, JUNK)

        return st.fixed_dictionaries(
            {k: field(k, v) for k, v in props.items() if k in required},
            optional={k: field(k, v) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, depth + 1), max_size=3)
    strategies = {
        "string": st.text(max_size=12),
        "integer": st.integers(-3, 40) | st.integers(),
        "number": st.floats(-3, 3) | st.floats(allow_nan=False, allow_infinity=False),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    return strategies.get(str(kind), JUNK)


@pytest.fixture(scope="module")
def operations(http: httpx.Client) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, body schema, components) of every JSON-body POST in our OpenAPI document."""
    doc = http.get("/openapi.json").json()
    defs = doc["components"]["schemas"]
    ops = []
    for path, methods in doc["paths"].items():
        body = methods.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            ops.append((path.replace("{name}", MODEL), schema, defs))
    return ops


def check_answer(resp: httpx.Response, body: Any) -> None:
    assert resp.status_code < 500, f"{resp.status_code} for {body!r}: {resp.text[:300]}"
    if resp.status_code >= 400:
        assert "error" in resp.json()
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        for line in resp.text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, f"stream error for {body!r}: {event}"


def test_fuzz_openapi_bodies_never_5xx(http: httpx.Client, operations: list[Any]) -> None:
    paths = {op[0] for op in operations}
    assert {COMPLETIONS, CHAT, f"/v2/models/{MODEL}/infer", f"/v1/models/{MODEL}:predict"} <= paths
    bodies = st.sampled_from(operations).flatmap(
        lambda op: st.tuples(st.just(op[0]), from_schema(op[1], op[2]))
    )

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(bodies)
    def run(case: tuple[str, Any]) -> None:
        path, body = case
        resp = http.post(path, json=body)
        check_answer(resp, body)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    statuses: dict[int, int] = {}
    run()
    # The fuzz must reach the engine, not only the validators.
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 20, statuses
    still_serving(http)


def test_fuzz_raw_bytes_never_5xx(http: httpx.Client, operations: list[Any]) -> None:
    @settings(max_examples=40, deadline=None, database=None, derandomize=True)
    @given(st.sampled_from([op[0] for op in operations]), st.binary(max_size=64))
    def run(path: str, raw: bytes) -> None:
        resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code < 500, f"{resp.status_code} for {raw!r}: {resp.text[:300]}"

    run()
    still_serving(http)


# Unicode edge cases: lone surrogates (both halves), a valid pair, NUL, BOM, right-to-left
# override, the last code point, 4-byte characters, a very long string; any character.
EDGE_STRINGS = st.sampled_from(
    [
        "\ud800",
        "x\udfffy",
        "a\ud83d",
        "\ud83d\ude00",
        "\x00",
        "nul\x00inside",
        "\ufeff",
        "\u202eevil",
        "\U0010ffff",
        "😀🧑‍🚀𝔘",
        "x" * 100_000,
    ]
) | st.text(st.characters(exclude_categories=()), max_size=8)


def with_edge_strings(value: Any, draw: Any) -> Any:
    """`value` with some of its strings (and keys) swapped for Unicode edge cases."""
    if isinstance(value, str):
        return draw(EDGE_STRINGS) if draw(st.booleans()) else value
    if isinstance(value, list):
        return [with_edge_strings(v, draw) for v in value]
    if isinstance(value, dict):
        return {with_edge_strings(k, draw): with_edge_strings(v, draw) for k, v in value.items()}
    return value


def test_fuzz_unicode_edge_cases_never_5xx(http: httpx.Client, operations: list[Any]) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(operations), st.data())
    def run(op: tuple[str, dict[str, Any], dict[str, Any]], data: st.DataObject) -> None:
        path, schema, defs = op
        body = with_edge_strings(data.draw(from_schema(schema, defs)), data.draw)
        # ensure_ascii: lone surrogates travel as \u escapes, as JSON clients send them.
        raw = json.dumps(body).encode()
        resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        check_answer(resp, body)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    statuses: dict[int, int] = {}
    run()
    assert statuses.get(200, 0) >= 5 and statuses.get(400, 0) >= 20, statuses
    still_serving(http)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"model": "tiny", "prompt": "x", "a": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001,
        b'{"prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes: not UTF-8
        b'{"prompt": "\xff\xfe"}',
    ],
    ids=["nested-lists", "nested-prompt", "nested-objects", "utf8-surrogate", "bad-utf8"],
)
def test_deep_nesting_and_bad_utf8_are_400s(http: httpx.Client, raw: bytes) -> None:
    for path in (COMPLETIONS, CHAT, f"/v2/models/{MODEL}/infer", f"/v1/models/{MODEL}:predict"):
        resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:300])
        assert "error" in resp.json()
    still_serving(http)
