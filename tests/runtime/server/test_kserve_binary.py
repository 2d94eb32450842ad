"""KServe V2 REST as Triton's client speaks it: the binary tensor extension, JSON without a
content type, and bad binary payloads answered 400 (never 500, never a big allocation)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from pinnace.runtime.server.errors import APIError
from pinnace.runtime.server.kserve_binary import (
    HEADER_LENGTH,
    MAX_BODY_BYTES,
    decode_bytes_tensor,
    encode_bytes_tensor,
    read_body,
)

MODEL = "tiny"
PROMPTS = ["What is the capital of France?", "Name a color:", "Count: one, two,"]
GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_model_len": 128}


@pytest.fixture(scope="module")
def expected(http: httpx.Client) -> list[str]:
    """What /v1/chat/completions answers to each prompt as a lone user message, greedy."""
    texts = []
    for prompt in PROMPTS:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **GREEDY}
        resp = http.post("/v1/chat/completions", json=body).json()
        texts.append(resp["choices"][0]["message"]["content"])
    return texts


@pytest.fixture(scope="module")
def triton(server: Any) -> Any:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def _as_text(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def test_triton_http_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("other")
    meta = triton.get_model_metadata(MODEL)
    assert meta["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [-1]}
    assert triton.get_server_metadata()["name"] == "pinnace"


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(False, False), (True, False), (True, True), (False, True)]
)
def test_triton_http_infer_matches_openai(
    triton: Any, expected: list[str], binary_in: bool, binary_out: bool
) -> None:
    tensor = triton_http.InferInput("text_input", [len(PROMPTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_), binary_data=binary_in)
    output = triton_http.InferRequestedOutput("text_output", binary_data=binary_out)
    result = triton.infer(MODEL, [tensor], outputs=[output], parameters=GREEDY)
    assert _as_text(result.as_numpy("text_output")) == expected
    # Binary outputs carry their size instead of data, as the extension says.
    params = result.get_output("text_output").get("parameters") or {}
    assert ("binary_data_size" in params) == binary_out


def test_triton_http_default_asks_binary_output(triton: Any, expected: list[str]) -> None:
    """Without requested outputs Triton's client sets binary_data_output on the request."""
    tensor = triton_http.InferInput("text_input", [len(PROMPTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_), binary_data=False)
    result = triton.infer(MODEL, [tensor], parameters=GREEDY)
    assert _as_text(result.as_numpy("text_output")) == expected
    assert "binary_data_size" in result.get_output("text_output")["parameters"]


def test_json_body_with_any_content_type(http: httpx.Client, expected: list[str]) -> None:
    body = json.dumps(_header(PROMPTS[:1], binary=False)).encode()
    for content_type in (None, "text/plain", "application/octet-stream"):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == expected[:1]


def test_binary_response_layout(http: httpx.Client, expected: list[str]) -> None:
    header = _header(PROMPTS, binary=True)
    header["outputs"] = [{"name": "text_output", "parameters": {"binary_data": True}}]
    resp = _post(http, header, encode_bytes_tensor(PROMPTS))
    assert resp.status_code == 200, resp.text
    size = int(resp.headers[HEADER_LENGTH])
    head = json.loads(resp.content[:size])
    blob = resp.content[size:]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": len(blob)}
    assert "data" not in head["outputs"][0]
    assert decode_bytes_tensor(blob, "out") == expected


def _header(prompts: list[str], binary: bool, size: int | None = None) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "text_input", "shape": [len(prompts)], "datatype": "BYTES"}
    if binary:
        raw = encode_bytes_tensor(prompts)
        tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    else:
        tensor["data"] = prompts
    return {"inputs": [tensor], "parameters": dict(GREEDY)}


def _post(
    http: httpx.Client, header: dict[str, Any], binary: bytes, header_length: str | None = None
) -> httpx.Response:
    head = json.dumps(header).encode()
    length = str(len(head)) if header_length is None else header_length
    return http.post(
        f"/v2/models/{MODEL}/infer",
        content=head + binary,
        headers={HEADER_LENGTH: length, "Content-Type": "application/octet-stream"},
    )


TWO_GB = 2**31
RAW = encode_bytes_tensor(["hi"])


@pytest.mark.parametrize(
    ("header", "binary", "header_length", "needle"),
    [
        # binary_data_size past the end of the body
        (_header(["hi"], True, size=len(RAW) + 5), RAW, None, "past the end"),
        (_header(["hi"], True, size=TWO_GB), RAW, None, "past the end"),
        # a BYTES element length of -1 (0xffffffff), and one of 2 GB
        (_header(["hi"], True, size=6), struct.pack("<i", -1) + b"hi", None, "claims 4294967295"),
        (_header(["hi"], True, size=6), struct.pack("<I", TWO_GB) + b"hi", None, "claims"),
        (_header(["hi"], True, size=3), b"\x02\x00\x00", None, "truncated"),
        # header length larger than the body, 2 GB, negative, not a number
        (_header(["hi"], True), RAW, str(TWO_GB), "request body has"),
        (_header(["hi"], True), RAW, "-5", "non-negative"),
        (_header(["hi"], True), RAW, "ten", "non-negative"),
        # header length that cuts the JSON short
        (_header(["hi"], True), RAW, "10", "not valid JSON"),
        # bytes left over, invalid UTF-8, binary data on a non-BYTES tensor, both forms
        (_header(["hi"], True), RAW + b"xx", None, "past the inputs"),
        (_header(["hi"], True, size=6), b"\x02\x00\x00\x00\xff\xfe", None, "UTF-8"),
        (
            {"inputs": [{**_header(["hi"], True)["inputs"][0], "datatype": "INT32"}]},
            RAW,
            None,
            "BYTES",
        ),
        ({"inputs": [{**_header(["hi"], True)["inputs"][0], "data": ["x"]}]}, RAW, None, "both"),
        (
            {
                "inputs": [
                    {**_header(["hi"], True)["inputs"][0], "parameters": {"binary_data_size": -1}}
                ]
            },
            b"",
            None,
            "non-negative",
        ),
    ],
)
def test_bad_binary_payloads_are_400(
    http: httpx.Client,
    header: dict[str, Any],
    binary: bytes,
    header_length: str | None,
    needle: str,
) -> None:
    resp = _post(http, header, binary, header_length)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]


def test_bad_binary_output_flags_are_400(http: httpx.Client) -> None:
    header = _header(["hi"], binary=False)
    header["parameters"]["binary_data_output"] = "yes"
    resp = _post(http, header, b"")
    assert resp.status_code == 400 and "binary_data_output" in resp.json()["error"]
    header = _header(["hi"], binary=False)
    header["outputs"] = [{"name": "text_output", "parameters": {"classification": 2}}]
    assert _post(http, header, b"").status_code == 400


def test_body_over_the_limit_is_refused_before_reading() -> None:
    async def chunks() -> Any:
        raise AssertionError("the body must not be read")
        yield b""  # an async generator

    with pytest.raises(APIError) as exc:
        asyncio.run(read_body(chunks(), str(TWO_GB)))
    assert exc.value.status == 413 and str(MAX_BODY_BYTES) in exc.value.message


def test_a_streamed_body_is_cut_off_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a Content-Length (chunked), the body is refused as soon as it passes the cap."""
    from pinnace.runtime.server import kserve_binary

    monkeypatch.setattr(kserve_binary, "MAX_BODY_BYTES", 10)
    read: list[int] = []

    async def chunks() -> Any:
        for _ in range(100):
            read.append(4)
            yield b"abcd"

    with pytest.raises(APIError) as exc:
        asyncio.run(read_body(chunks(), None))
    assert exc.value.status == 413 and sum(read) == 12  # stopped at the third chunk

    async def small() -> Any:
        yield b"abcd"
        yield b"efgh"

    assert asyncio.run(read_body(small(), None)) == b"abcdefgh"  # under the cap: all of it
