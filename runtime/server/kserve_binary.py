"""The Open Inference Protocol's binary tensor extension (Triton's `binary_tensor_data`).

A request body is a JSON header followed by raw tensor bytes:

    | JSON header (Inference-Header-Content-Length bytes) | input 0 bytes | input 1 bytes |...

An input whose `parameters.binary_data_size` is set has no `data`: its bytes come next in
the binary part, in input order. A BYTES tensor is laid out element by element, each as a
4-byte little-endian length and then that many bytes. Responses use the same layout for
outputs asked for as binary (`parameters.binary_data_output` on the request or
`parameters.binary_data` on an output), with the header length in the response header.

Every length read from the wire is checked against the bytes actually there before it is
used, so a claimed length (2 GB, or a negative one read as a huge unsigned number) is a 400
and never an allocation: slices of a memoryview copy nothing.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterable
from typing import Any

from starlette.responses import Response

from pinnace.runtime.server.errors import APIError, bad_request

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
# A request body past this is refused while it streams in (prompts are text: 64 MiB is
# over a hundred times the longest context window this server runs).
MAX_BODY_BYTES = 64 * 2**20
_LENGTH = struct.Struct("<I")


async def read_body(chunks: AsyncIterable[bytes], content_length: str | None) -> bytes:
    """The request body, refused (413) once it passes MAX_BODY_BYTES, before it is read
    where the client declares it, or as it streams in where it does not."""
    declared = int(content_length) if content_length and content_length.isdigit() else 0
    if declared > MAX_BODY_BYTES:
        raise _too_large(declared)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large(len(body))
    return bytes(body)


def _too_large(size: int) -> APIError:
    return APIError(413, f"the request body ({size} bytes) is over {MAX_BODY_BYTES} bytes.")


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(parsed JSON header, binary part). Without the header the whole body is JSON,
    whatever its content type (Triton's client sends none)."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        size = _parse_header_length(header_length, len(body))
        json_part, binary = view[:size], view[size:]
    try:
        return json.loads(bytes(json_part)), binary
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request's JSON header is not valid JSON ({exc}).") from exc


def _parse_header_length(value: str, body_size: int) -> int:
    text = value.strip()
    if not text.isdigit():  # no sign, no spaces inside, ASCII digits only
        raise bad_request(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}.")
    size = int(text)
    if size > body_size:
        raise bad_request(f"{HEADER_LENGTH} is {size} but the request body has {body_size} bytes.")
    return size


def attach_binary_inputs(header: Any, binary: memoryview) -> None:
    """Move each binary input's bytes into its `data` (as decoded BYTES elements), in
    place; 400 when the sizes and the binary part disagree."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    offset = 0
    for tensor in inputs if isinstance(inputs, list) else []:
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        name = tensor.get("name")
        size = params.pop("binary_data_size")
        if type(size) is not int or size < 0:
            raise bad_request(f"input {name!r}: binary_data_size must be a non-negative integer.")
        if offset + size > len(binary):
            raise bad_request(
                f"input {name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} binary bytes left)."
            )
        if "data" in tensor:
            raise bad_request(f"input {name!r} has both data and binary_data_size.")
        if tensor.get("datatype") != "BYTES":
            raise bad_request(f"input {name!r}: binary data is only read for BYTES tensors.")
        tensor["data"] = decode_bytes_tensor(binary[offset : offset + size], f"input {name!r}")
        offset += size
    if offset != len(binary):
        raise bad_request(
            f"the body has {len(binary) - offset} binary bytes past the inputs' binary_data_size."
        )


def decode_bytes_tensor(raw: memoryview | bytes, where: str) -> list[str]:
    """Length-prefixed elements -> their UTF-8 text; 400 naming the bad element."""
    view = memoryview(raw)
    out: list[str] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise bad_request(
                f"{where}: element {len(out)} has a truncated 4-byte length "
                f"({len(view) - pos} byte(s) left)."
            )
        (size,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if size > len(view) - pos:
            raise bad_request(
                f"{where}: element {len(out)} claims {size} bytes but {len(view) - pos} remain "
                "(lengths are 4-byte little-endian unsigned)."
            )
        try:
            out.append(str(view[pos : pos + size], "utf-8"))
        except UnicodeDecodeError as exc:
            raise bad_request(f"{where}: element {len(out)} is not valid UTF-8 text.") from exc
        pos += size
    return out


def encode_bytes_tensor(texts: list[str]) -> bytes:
    """Texts -> the length-prefixed BYTES layout."""
    parts: list[bytes] = []
    for text in texts:
        data = text.encode("utf-8")
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def wants_binary_output(request_params: Any, output_params: Any) -> bool:
    """An output's own `binary_data` wins over the request's `binary_data_output`."""
    for params, key in ((output_params, "binary_data"), (request_params, "binary_data_output")):
        if isinstance(params, dict) and key in params:
            value = params[key]
            if not isinstance(value, bool):
                raise bad_request(f"parameters.{key} must be true or false, got {value!r}.")
            return value
    return False


def binary_response(header: dict[str, Any], blobs: list[bytes]) -> Response:
    """A JSON header followed by the outputs' bytes, its length in HEADER_LENGTH."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(
        b"".join([head, *blobs]),
        media_type=BINARY_CONTENT_TYPE,
        headers={HEADER_LENGTH: str(len(head))},
    )
