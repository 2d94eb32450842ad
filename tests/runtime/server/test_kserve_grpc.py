"""The Open Inference Protocol over gRPC, against a real server with an API key: Triton's
client (raw contents), the proto's own messages (bytes_contents), errors as status codes,
and a fuzz of ModelInfer that must never answer INTERNAL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from pinnace.runtime.server import oip_proto
from pinnace.runtime.server.kserve_binary import encode_bytes_tensor

MODEL = "tiny"
API_KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
PROMPTS = ["What is the capital of France?", "Name a color:", "Count: one, two,"]
GREEDY = {"max_tokens": 8, "temperature": 0}
SERVICE = "/inference.GRPCInferenceService"
# What a client may be told about a bad request; never INTERNAL or UNKNOWN.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    grpc_settings = {"grpc_port": 0, "grpc_host": "127.0.0.1", "api_key": API_KEY}
    return {"max_model_len": 128, "settings": grpc_settings}


@pytest.fixture(scope="module")
def address(server: Any) -> str:
    return f"127.0.0.1:{server.app.state.grpc_port}"


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
def triton(address: str) -> Iterator[Any]:
    client = triton_grpc.InferenceServerClient(url=address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


def call(channel: grpc.Channel, method: str, request: Any, **kwargs: Any) -> Any:
    """One RPC with the proto's own messages (built as the server builds them)."""
    response = oip_proto.load().message(f"{method}Response")
    rpc = channel.unary_unary(
        f"{SERVICE}/{method}",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    return rpc(request, metadata=tuple(AUTH.items()), timeout=60, **kwargs)


def _texts(values: Any) -> list[str]:
    return [v.decode() for v in values.reshape(-1)]


def test_triton_grpc_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()  # open, as on HTTP
    assert triton.is_model_ready(MODEL, headers=AUTH)
    meta = triton.get_server_metadata(headers=AUTH)
    assert meta.name == "pinnace" and "binary_tensor_data" in meta.extensions
    model = triton.get_model_metadata(MODEL, headers=AUTH)
    assert model.name == MODEL and model.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("text_input", "BYTES", [-1])
    ]
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata("other", headers=AUTH)
    assert "NOT_FOUND" in exc.value.status() and "other" in exc.value.message()


def test_triton_grpc_infer_matches_openai(triton: Any, expected: list[str]) -> None:
    tensor = triton_grpc.InferInput("text_input", [len(PROMPTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_))
    result = triton.infer(
        MODEL,
        [tensor],
        outputs=[triton_grpc.InferRequestedOutput("text_output")],
        parameters=GREEDY,
        request_id="r-1",
        headers=AUTH,
    )
    assert _texts(result.as_numpy("text_output")) == expected
    assert result.get_response().id == "r-1"


def test_bytes_contents_in_and_out(channel: grpc.Channel, expected: list[str]) -> None:
    request = _infer_request(PROMPTS)
    response = call(channel, "ModelInfer", request)
    (output,) = response.outputs
    assert list(output.shape) == [3] and not response.raw_output_contents
    assert [b.decode() for b in output.contents.bytes_contents] == expected
    versioned = call(channel, "ModelInfer", _infer_request(PROMPTS[:1], model_version="1"))
    assert versioned.model_version == "1"


def _infer_request(prompts: list[str], raw: bool = False, **fields: Any) -> Any:
    proto = oip_proto.load()
    request = proto.message("ModelInferRequest")(**{"model_name": MODEL, **fields})
    request.parameters["max_tokens"].int64_param = GREEDY["max_tokens"]
    request.parameters["temperature"].int64_param = GREEDY["temperature"]
    tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[len(prompts)])
    if raw:
        request.raw_input_contents.append(encode_bytes_tensor(prompts))
    else:
        tensor.contents.bytes_contents.extend(p.encode() for p in prompts)
    return request


def _raw(data: bytes) -> Any:
    request = _infer_request([], raw=False)
    request.inputs[0].shape[:] = [1]
    request.raw_input_contents.append(data)
    return request


@pytest.mark.parametrize(
    ("request_fn", "code", "needle"),
    [
        (lambda: _infer_request(["hi"], model_name="other"), "NOT_FOUND", "other"),
        (lambda: _raw(b"\xff\xff\xff\xffhi"), "INVALID_ARGUMENT", "claims 4294967295"),
        (lambda: _raw((2**31).to_bytes(4, "little") + b"hi"), "INVALID_ARGUMENT", "claims"),
        (lambda: _raw(b"\x02\x00"), "INVALID_ARGUMENT", "truncated"),
        (lambda: _raw(b"\x02\x00\x00\x00\xff\xfe"), "INVALID_ARGUMENT", "UTF-8"),
        (
            lambda: _infer_request(["hi"], raw_input_contents=[b"", b""]),
            "INVALID_ARGUMENT",
            "raw_input_contents has 2 entries",
        ),
        (lambda: _infer_request(["a", "b"], raw=True, id="x"), None, None),
        (lambda: b"\xff\xff\xff", "INVALID_ARGUMENT", "not a valid ModelInferRequest"),
    ],
)
def test_infer_errors_are_status_codes(
    channel: grpc.Channel, request_fn: Any, code: str | None, needle: str | None
) -> None:
    if code is None:  # the control case: raw in, raw out
        response = call(channel, "ModelInfer", request_fn())
        assert len(response.raw_output_contents) == 1 and response.id == "x"
        return
    with pytest.raises(grpc.RpcError) as exc:
        call(channel, "ModelInfer", request_fn())
    assert exc.value.code().name == code, exc.value.details()
    assert needle in exc.value.details()


def test_parameters_are_checked_as_on_rest(channel: grpc.Channel) -> None:
    request = _infer_request(["hi"])
    request.parameters["beam_width"].int64_param = 4
    with pytest.raises(grpc.RpcError) as exc:
        call(channel, "ModelInfer", request)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beam_width" in exc.value.details()
    request = _infer_request(["hi"])
    request.parameters["top_p"].string_param = "0.5"  # floats also travel as strings
    assert call(channel, "ModelInfer", request).outputs[0].name == "text_output"


def test_triton_double_param_is_read(channel: grpc.Channel, expected: list[str]) -> None:
    """Triton's proto adds double_param (field 4), which KServe's proto lacks; newer Triton
    clients send float settings with it."""
    wide = oip_proto.load().wide_parameter
    request = _infer_request(PROMPTS[:1])
    request.parameters["temperature"].Clear()
    request.parameters["temperature"].MergeFromString(wide(double_param=0.0).SerializeToString())
    response = call(channel, "ModelInfer", request)
    assert [b.decode() for b in response.outputs[0].contents.bytes_contents] == expected[:1]
    request.parameters["temperature"].MergeFromString(wide(double_param=-1.0).SerializeToString())
    with pytest.raises(grpc.RpcError) as exc:
        call(channel, "ModelInfer", request)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in exc.value.details()


def test_api_key_is_required(address: str) -> None:
    with grpc.insecure_channel(address) as ch:
        rpc = ch.unary_unary(
            f"{SERVICE}/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        for metadata, needle in [
            ((), "Missing API key"),
            ((("authorization", "Bearer x"),), "Incorrect"),
        ]:
            with pytest.raises(grpc.RpcError) as exc:
                rpc(_infer_request(["hi"]), metadata=metadata, timeout=30)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert needle in exc.value.details()


_names = st.sampled_from(["text_input", "text_output", "", "x"])
_types = st.sampled_from(["BYTES", "INT32", "FP32", ""])
_param_keys = st.sampled_from(
    ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "junk"]
)


@st.composite
def infer_requests(draw: st.DrawFn) -> Any:
    proto = oip_proto.load()
    request = proto.message("ModelInferRequest")(
        model_name=draw(st.sampled_from([MODEL, "", "other", f"{MODEL}/versions/2"])),
        model_version=draw(st.sampled_from(["", "1", "7"])),
        id=draw(st.text(max_size=8)),
    )
    for key in draw(st.lists(_param_keys, max_size=3)):
        param = request.parameters[key]
        kind = draw(st.sampled_from(["bool", "int", "string", "none"]))
        if kind == "bool":
            param.bool_param = draw(st.booleans())
        elif kind == "int":
            # Small token counts keep each example quick; the rest of int64 is fair game.
            param.int64_param = draw(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 4))
        elif kind == "string":
            param.string_param = draw(st.text(max_size=6))
    request.parameters["max_tokens"].int64_param = draw(st.integers(-2, 3))
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(st.lists(st.integers(-(2**40), 2**40) | st.integers(0, 3), max_size=3))
        tensor = request.inputs.add(name=draw(_names), datatype=draw(_types), shape=shape)
        prompts = draw(st.lists(st.text(max_size=12), max_size=3))
        if use_raw:
            blob = encode_bytes_tensor(prompts)
            request.raw_input_contents.append(
                draw(st.sampled_from([blob, blob[:-1]])) + draw(st.binary(max_size=6))
            )
        else:
            tensor.contents.bytes_contents.extend(p.encode() for p in prompts)
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=2)))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(_names))
        if draw(st.booleans()):
            output.parameters["binary_data"].bool_param = True
    return request


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=infer_requests() | st.binary(max_size=40))
def test_fuzz_model_infer_never_internal(channel: grpc.Channel, request: Any) -> None:
    try:
        call(channel, "ModelInfer", request)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
