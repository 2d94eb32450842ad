"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), beside HTTP.

It runs on the HTTP server's event loop with the same engine and the same request path as
`POST /v2/models/{name}/infer` (parse -> `infer_requests` -> collect): a ModelInferRequest
is turned into the REST body it stands for. BYTES inputs come as `contents.bytes_contents`
or as length-prefixed `raw_input_contents` (Triton's client); the answer mirrors the
request's form. Errors are status codes (APIError's HTTP status mapped below) with the
message REST would give; with an API key, every RPC but ServerLive/ServerReady needs the
metadata `authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pinnace.runtime.engine.async_engine import EngineDeadError
from pinnace.runtime.server import oip_proto
from pinnace.runtime.server.errors import APIError, bad_request
from pinnace.runtime.server.kserve_binary import (
    MAX_BODY_BYTES,
    decode_bytes_tensor,
    encode_bytes_tensor,
)
from pinnace.runtime.server.kserve_embeddings import EMBEDDING_OUTPUT, embed_infer
from pinnace.runtime.server.kserve_protocol import TEXT_INPUT, TEXT_OUTPUT
from pinnace.runtime.server.kserve_v2 import (
    EXTENSIONS,
    MODEL_VERSION,
    PLATFORM,
    infer_requests,
    parse_infer_request,
    resolve,
)
from pinnace.runtime.server.serving import ServerContext, server_version

logger = logging.getLogger(__name__)

OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes hold no key, as on HTTP
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class InferenceService:
    """One method per RPC of the proto's service, each `(request) -> response`."""

    def __init__(self, ctx: ServerContext, protocol: oip_proto.OipProtocol) -> None:
        self.ctx = ctx
        self.proto = protocol

    async def ServerLive(self, request: Any) -> Any:
        return self.proto.message("ServerLiveResponse")(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return self.proto.message("ServerReadyResponse")(ready=self._healthy())

    async def ModelReady(self, request: Any) -> Any:
        self._resolve(request.name, request.version)
        return self.proto.message("ModelReadyResponse")(ready=self._healthy())

    async def ServerMetadata(self, request: Any) -> Any:
        response = self.proto.message("ServerMetadataResponse")
        return response(name=PLATFORM, version=server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: Any) -> Any:
        model, _ = self._resolve(request.name, request.version)
        response = self.proto.message("ModelMetadataResponse")
        tensor = response.TensorMetadata
        output = tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])
        if self.ctx.engine.runner_type == "pooling":
            hidden = int(self.ctx.engine.model_config.hidden_size)
            output = tensor(name=EMBEDDING_OUTPUT, datatype="FP32", shape=[-1, hidden])
        return response(
            name=model,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=TEXT_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[output],
        )

    async def ModelInfer(self, request: Any) -> Any:
        model, version = self._resolve(request.model_name, request.model_version)
        body = parse_infer_request(self._rest_body(request))
        if self.ctx.engine.runner_type == "pooling":
            return await self._embeddings(request, body, model, version)
        requests, shape, _ = await asyncio.to_thread(infer_requests, self.ctx, body, model)
        finals = await self.ctx.collect(requests)
        texts = [f.outputs[0].text for f in finals]
        response = self.proto.message("ModelInferResponse")(
            model_name=model, model_version=version or "", id=request.id
        )
        output = response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=shape)
        if request.raw_input_contents:
            response.raw_output_contents.append(encode_bytes_tensor(texts))
        else:
            output.contents.bytes_contents.extend(t.encode() for t in texts)
        return response

    async def _embeddings(self, request: Any, body: Any, model: str, version: str | None) -> Any:
        """A pooling server's ModelInfer: the FP32 `embedding` tensor (kserve_embeddings)."""
        shape, vectors = await embed_infer(self.ctx, body, model)
        response = self.proto.message("ModelInferResponse")(
            model_name=model, model_version=version or "", id=request.id
        )
        output = response.outputs.add(name=EMBEDDING_OUTPUT, datatype="FP32", shape=shape)
        if request.raw_input_contents:
            response.raw_output_contents.append(vectors.astype("<f4").tobytes())
        else:
            output.contents.fp32_contents.extend(vectors.reshape(-1).tolist())
        return response

    def _resolve(self, name: str, version: str) -> tuple[str, str | None]:
        return resolve(self.ctx, f"{name}/versions/{version}" if version else name)

    def _healthy(self) -> bool:
        try:
            self.ctx.engine.check_health()
        except EngineDeadError:
            return False
        return True

    def _rest_body(self, request: Any) -> dict[str, Any]:
        """The V2 REST body a ModelInferRequest stands for (BYTES decoded to text)."""
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise bad_request(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs."
            )
        inputs = []
        for i, tensor in enumerate(request.inputs):
            params = self._parameters(tensor.parameters, f"inputs[{i}].parameters")
            # KServe's SDK labels raw contents with their size, as on REST: check, drop.
            size = params.pop("binary_data_size", None)
            if size is not None and (not raw or size != len(raw[i])):
                raise bad_request(
                    f"inputs[{i}]: binary_data_size {size} does not match its raw contents."
                )
            entry = {
                "name": tensor.name,
                "shape": list(tensor.shape),
                "datatype": tensor.datatype,
                "parameters": params or None,
                "data": self._tensor_data(tensor, raw[i] if raw else None, i),
            }
            inputs.append(entry)
        outputs = [
            {"name": o.name, "parameters": self._parameters(o.parameters, "outputs.parameters")}
            for o in request.outputs
        ]
        return {
            "id": request.id or None,
            "parameters": self._parameters(request.parameters, "parameters") or None,
            "inputs": inputs,
            "outputs": outputs or None,
        }

    def _tensor_data(self, tensor: Any, raw: bytes | None, index: int) -> list[Any]:
        where = f"inputs[{index}]"
        contents = tensor.contents
        filled = [field.name for field, _ in contents.ListFields()]
        if raw is not None:
            if filled:
                raise bad_request(f"{where} has both contents and raw_input_contents.")
            if tensor.datatype != "BYTES":
                raise bad_request(f"{where} must have datatype BYTES, got {tensor.datatype!r}.")
            return decode_bytes_tensor(raw, f"raw_input_contents[{index}]")
        if filled and filled != ["bytes_contents"]:
            # Numbers are not prompts; text_prompts() says why in the REST words.
            return list(getattr(contents, filled[0]))
        try:
            return [b.decode("utf-8") for b in contents.bytes_contents]
        except UnicodeDecodeError as exc:
            raise bad_request(f"{where}: bytes_contents must be UTF-8 text.") from exc

    def _parameters(self, params: Any, where: str) -> dict[str, Any]:
        """An InferParameter map as plain values; Triton's double/uint64 kinds included."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            wide = self.proto.wide_parameter.FromString(value.SerializeToString())
            kind = wide.WhichOneof("parameter_choice")
            if kind is None:
                raise bad_request(f"{where}.{key} has no value.")
            out[key] = getattr(wide, kind)
        return out


class _Undecodable:
    """A request that is not its message (grpc would answer INTERNAL; it is the client's)."""

    def __init__(self, name: str, error: Exception) -> None:
        self.error = APIError(400, f"the request is not a valid {name} message ({error}).")


def _parser(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return _Undecodable(message.DESCRIPTOR.name, exc)

    return parse


def _status(exc: APIError) -> grpc.StatusCode:
    if exc.status in _CODES:
        return _CODES[exc.status]
    return grpc.StatusCode.INTERNAL if exc.status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _handler(name: str, method: Callable[[Any], Awaitable[Any]], api_key: str | None) -> Handler:
    """`method` with auth, and errors turned into status codes (never a stack trace)."""
    expected = f"Bearer {api_key}" if api_key else None

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if expected is not None and name not in OPEN_METHODS:
                _authorize(context, expected)
            if isinstance(request, _Undecodable):
                raise request.error
            return await method(request)
        except APIError as exc:
            code, message = _status(exc), exc.message
        except Exception as exc:
            logger.exception("unhandled error in gRPC %s", name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"
        await context.abort(code, message)

    return handle


def _authorize(context: grpc.aio.ServicerContext, expected: str) -> None:
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    given = metadata.get("authorization", "")
    if not given:
        raise APIError(401, "Missing API key: send the metadata 'authorization: Bearer <key>'.")
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise APIError(401, "Incorrect API key provided.")


def generic_handler(ctx: ServerContext, api_key: str | None) -> grpc.GenericRpcHandler:
    """The proto's service, each RPC served by InferenceService's method of that name."""
    protocol = oip_proto.load()
    service = InferenceService(ctx, protocol)
    handlers = {}
    for rpc in protocol.service.methods:
        if rpc.client_streaming or rpc.server_streaming or not hasattr(service, rpc.name):
            continue  # left UNIMPLEMENTED
        handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
            _handler(rpc.name, getattr(service, rpc.name), api_key),
            request_deserializer=_parser(protocol.messages[rpc.input_type.full_name]),
            response_serializer=lambda message: message.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(protocol.service.full_name, handlers)


async def start_grpc_server(
    ctx: ServerContext, host: str, port: int, api_key: str | None
) -> tuple[grpc.aio.Server, int]:
    """A started server on the running event loop, and the port it bound (for port 0)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_BODY_BYTES),
            ("grpc.max_send_message_length", MAX_BODY_BYTES),
        ]
    )
    server.add_generic_rpc_handlers((generic_handler(ctx, api_key),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind": say which address
        raise OSError(f"the gRPC server could not bind {address}: {exc}") from exc
    await server.start()
    return server, bound
