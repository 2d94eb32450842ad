"""The Open Inference Protocol's gRPC messages, built from KServe's `grpc_predict_v2.proto`.

Where the proto comes from: no wheel on PyPI ships it (kserve's and tritonclient's wheels
ship only code generated from their own copies), and it is not copied into this
repository. It is read from $PINNACE_OIP_PROTO (the runtime image sets it to the copy its
build takes from KServe's predict-api-v2, see the Dockerfile), else from the shared data
beside a source checkout (`../shared/data/kserve-v0.20.0/predict-api-v2`), as the tests
use it.

How it becomes code: grpcio-tools' protoc compiles it, on first use, into a descriptor set
cached under $PINNACE_GRPC_CACHE (default ~/.cache/pinnace/grpc) by a hash of the proto
and the protoc version; the image compiles it at build time into a read-only cache. The
message classes are then made in a private descriptor pool rather than by importing
generated `_pb2` modules, because those register `inference.*` in protobuf's global pool,
where Triton's and KServe's client libraries register their own, different
`inference.*`: a server built on generated modules cannot share a process with those
clients (an embedding app, or this project's tests).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor

PROTO_ENV = "PINNACE_OIP_PROTO"
CACHE_ENV = "PINNACE_GRPC_CACHE"
PROTO_NAME = "grpc_predict_v2.proto"
SERVICE = "inference.GRPCInferenceService"
# runtime/server/oip_proto.py -> the repository root -> ../shared/data beside it.
SHARED_PROTO = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "kserve-v0.20.0"
    / "predict-api-v2"
    / PROTO_NAME
)


@dataclass(frozen=True)
class OipProtocol:
    """The service descriptor and a message class per full name (`inference.ModelInferRequest`)."""

    service: ServiceDescriptor
    messages: dict[str, Any]
    # InferParameter as Triton's proto has it (adds double_param = 4, uint64_param = 5),
    # to read the float settings (temperature, top_p) its client sends.
    wide_parameter: Any

    def message(self, short_name: str) -> Any:
        return self.messages[f"inference.{short_name}"]


def proto_path() -> Path:
    configured = os.environ.get(PROTO_ENV)
    path = Path(configured) if configured else SHARED_PROTO
    if not path.is_file():
        where = f"${PROTO_ENV}={configured}" if configured else str(SHARED_PROTO)
        raise FileNotFoundError(
            f"gRPC needs KServe's Open Inference Protocol proto ({PROTO_NAME}, in KServe's "
            f"docs/predict-api/v2); it is not at {where}: set ${PROTO_ENV} to its path."
        )
    return path


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pinnace" / "grpc"


def descriptor_set(proto: Path) -> bytes:
    """The compiled FileDescriptorSet of `proto`, from the cache or protoc (then cached)."""
    source = proto.read_bytes()
    key = hashlib.sha256(source + importlib.metadata.version("grpcio-tools").encode())
    cached = cache_dir() / f"{proto.stem}-{key.hexdigest()[:16]}.binpb"
    if cached.is_file():
        return cached.read_bytes()
    data = _compile(proto)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, cached)  # atomic: a concurrent reader sees all or nothing
    except OSError:  # a read-only cache: use what was compiled, every time
        pass
    return data


def _compile(proto: Path) -> bytes:
    from grpc_tools import protoc  # only here: the compiler is a few MB of C++

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "oip.binpb"
        args = ["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc could not compile {proto}; see its message above.")
        return out.read_bytes()


@functools.cache
def load() -> OipProtocol:
    """The protocol's messages (compiled once per process)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set(proto_path())).file
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    wide = _wide_parameter_file()
    pool.Add(wide)
    messages = message_factory.GetMessages([*files, wide], pool=pool)
    return OipProtocol(
        service=pool.FindServiceByName(SERVICE),
        messages=messages,
        wide_parameter=messages["pinnace.oip.WideInferParameter"],
    )


def _wide_parameter_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="pinnace/oip_wide_parameter.proto", package="pinnace.oip", syntax="proto3"
    )
    message = file.message_type.add(name="WideInferParameter")
    message.oneof_decl.add(name="parameter_choice")
    kinds = descriptor_pb2.FieldDescriptorProto
    fields = [
        ("bool_param", kinds.TYPE_BOOL),
        ("int64_param", kinds.TYPE_INT64),
        ("string_param", kinds.TYPE_STRING),
        ("double_param", kinds.TYPE_DOUBLE),
        ("uint64_param", kinds.TYPE_UINT64),
    ]
    for number, (name, kind) in enumerate(fields, start=1):
        message.field.add(
            name=name, number=number, type=kind, label=kinds.LABEL_OPTIONAL, oneof_index=0
        )
    return file
