"""KServe V2 (Open Inference Protocol) and V1 against a real server, checked with the
protocol's own OpenAPI document and against the OpenAI endpoint's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

MODEL = "tiny"
# The Open Inference Protocol spec lives in the shared test data beside the repository.
REPO = Path(__file__).resolve().parents[3]
SPEC = REPO.parent / "shared" / "data" / "kserve-v0.20.0" / "predict-api-v2"
SPEC = SPEC / "rest_predict_v2.yaml"
PROMPTS = ["What is the capital of France?", "Name a color:"]
GREEDY = {"max_tokens": 8, "temperature": 0}
# The V2 document has no V1 schemas; V1's response is `{"predictions": [...]}`.
V1_RESPONSE = {
    "type": "object",
    "required": ["predictions"],
    "properties": {"predictions": {"type": "array", "items": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_model_len": 128}


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    # CI always has the shared data: a missing spec is a failure, not a skip.
    assert SPEC.is_file(), f"{SPEC} is missing (the shared test data beside the repository)"
    return yaml.safe_load(SPEC.read_text())["components"]


def check(components: dict[str, Any], name: str, body: Any) -> None:
    """Validate `body` against components/schemas/<name> of the KServe V2 document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    jsonschema.Draft7Validator(schema).validate(body)


def completion_texts(http: httpx.Client, prompts: list[str]) -> list[str]:
    body = {"model": MODEL, "prompt": prompts, **GREEDY}
    resp = http.post("/v1/completions", json=body).json()
    return [c["text"] for c in resp["choices"]]


def chat_texts(http: httpx.Client, prompts: list[str]) -> list[str]:
    """What /v1/chat/completions answers to each prompt as a lone user message."""
    texts = []
    for prompt in prompts:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **GREEDY}
        texts.append(
            http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        )
    return texts


def infer_body(prompts: list[str], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "text_input", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}
    return {"inputs": [tensor], "parameters": dict(GREEDY), **extra}


def test_v2_metadata_and_health(http: httpx.Client, components: dict[str, Any]) -> None:
    meta = http.get("/v2")
    assert meta.status_code == 200
    check(components, "metadata_server_response", meta.json())
    assert "generate" in meta.json()["extensions"]
    assert http.get("/v2/").json() == meta.json()
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    model = http.get(f"/v2/models/{MODEL}").json()
    check(components, "metadata_model_response", model)
    assert model["inputs"][0]["name"] == "text_input" and model["outputs"][0]["datatype"] == "BYTES"
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert http.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
    missing = http.get("/v2/models/other")
    assert missing.status_code == 404
    check(components, "metadata_model_error_response", missing.json())


def test_v2_infer_batch_equals_openai(http: httpx.Client, components: dict[str, Any]) -> None:
    resp = http.post(f"/v2/models/{MODEL}/infer", json=infer_body(PROMPTS, id="req-1"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    check(components, "inference_response", body)
    (output,) = body["outputs"]
    assert body["id"] == "req-1" and body["model_name"] == MODEL
    assert output["name"] == "text_output" and output["shape"] == [2]
    # The model has a chat template, so by default each text is a user message.
    assert output["data"] == chat_texts(http, PROMPTS)
    raw = infer_body(PROMPTS)
    raw["parameters"]["apply_chat_template"] = False
    resp = http.post(f"/v2/models/{MODEL}/infer", json=raw)
    check(components, "inference_response", resp.json())
    assert resp.json()["outputs"][0]["data"] == completion_texts(http, PROMPTS)
    versioned = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=infer_body(PROMPTS[:1]))
    check(components, "inference_response", versioned.json())
    assert versioned.json()["model_version"] == "1"
    assert versioned.json()["outputs"][0]["data"] == output["data"][:1]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b["inputs"][0].update(name="prompt"), "text_input"),
        (lambda b: b["inputs"][0].update(datatype="INT32"), "BYTES"),
        (lambda b: b["inputs"][0].update(shape=[3]), "shape"),
        (lambda b: b["inputs"][0].update(data=[1, 2]), "strings"),
        (lambda b: b["parameters"].update(beam_width=4), "beam_width"),
        (lambda b: b["parameters"].update(temperature=-1), "temperature"),
        (lambda b: b["inputs"][0].update(data=["x " * 300, "y"]), "max_model_len"),
        (lambda b: b.update(outputs=[{"name": "logits"}]), "logits"),
        (lambda b: b.pop("inputs"), "inputs"),
    ],
)
def test_v2_infer_bad_input(
    http: httpx.Client, components: dict[str, Any], mutate: Any, needle: str
) -> None:
    body = infer_body(PROMPTS)
    mutate(body)
    resp = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert resp.status_code == 400, resp.text
    check(components, "inference_error_response", resp.json())
    assert isinstance(resp.json()["error"], str) and needle in resp.json()["error"]


def test_v2_infer_unknown_model_and_bad_json(http: httpx.Client) -> None:
    resp = http.post("/v2/models/other/infer", json=infer_body(PROMPTS))
    assert resp.status_code == 404 and "other" in resp.json()["error"]
    resp = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


def test_v2_generate_and_stream(http: httpx.Client) -> None:
    (expected,) = chat_texts(http, PROMPTS[:1])
    resp = http.post(
        f"/v2/models/{MODEL}/generate", json={"text_input": PROMPTS[0], "parameters": GREEDY}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["text_output"] == expected and resp.json()["model_name"] == MODEL
    top_level = http.post(f"/v2/models/{MODEL}/generate", json={"text_input": PROMPTS[0], **GREEDY})
    assert top_level.json()["text_output"] == expected
    body = {"text_input": PROMPTS[0], "parameters": GREEDY}
    with http.stream("POST", f"/v2/models/{MODEL}/generate_stream", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "length"
    bad = http.post(f"/v2/models/{MODEL}/generate", json={"text_input": "x", "stream_it": True})
    assert bad.status_code == 400 and "stream_it" in bad.json()["error"]


def test_v1_predict_equals_openai(http: httpx.Client) -> None:
    expected = chat_texts(http, PROMPTS)
    body = {"instances": [PROMPTS[0], {"prompt": PROMPTS[1]}], "parameters": GREEDY}
    resp = http.post(f"/v1/models/{MODEL}:predict", json=body)
    assert resp.status_code == 200, resp.text
    jsonschema.validate(resp.json(), V1_RESPONSE)
    assert resp.json()["predictions"] == expected
    raw = {"instances": PROMPTS, "parameters": {**GREEDY, "apply_chat_template": False}}
    resp = http.post(f"/v1/models/{MODEL}:predict", json=raw)
    assert resp.json()["predictions"] == completion_texts(http, PROMPTS)
    # An instance's own settings win over the request's parameters.
    body = {"instances": [{"prompt": PROMPTS[0], "max_tokens": 2}], "parameters": GREEDY}
    short = http.post(f"/v1/models/{MODEL}:predict", json=body).json()["predictions"][0]
    assert expected[0].startswith(short) and len(short) < len(expected[0])


def test_v1_readiness_and_errors(http: httpx.Client) -> None:
    ready = http.get(f"/v1/models/{MODEL}").json()
    assert ready["name"] == MODEL and ready["ready"] is True and ready["id"] == MODEL
    assert http.get("/v1/models/other").status_code == 404
    resp = http.post("/v1/models/other:predict", json={"instances": ["x"]})
    assert resp.status_code == 404 and isinstance(resp.json()["error"], str)
    resp = http.post(f"/v1/models/{MODEL}:predict", json={"instances": []})
    assert resp.status_code == 400 and "instances" in resp.json()["error"]
    resp = http.post(
        f"/v1/models/{MODEL}:predict", json={"instances": [{"prompt": "x", "top_k": -5}]}
    )
    assert resp.status_code == 400 and "top_k" in resp.json()["error"]
