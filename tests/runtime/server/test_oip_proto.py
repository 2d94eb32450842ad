"""Where the gRPC protocol's proto is found, and its compiled form cached."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pinnace.runtime.server import oip_proto


def test_the_shared_proto_is_there() -> None:
    # CI always has the shared data: a missing proto is a failure, not a skip.
    assert oip_proto.SHARED_PROTO.is_file(), f"{oip_proto.SHARED_PROTO} is missing"


def test_a_missing_proto_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(oip_proto.PROTO_ENV, str(tmp_path / "nope.proto"))
    with pytest.raises(FileNotFoundError, match=oip_proto.PROTO_ENV):
        oip_proto.proto_path()


def test_compiled_once_then_read_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(oip_proto.CACHE_ENV, str(tmp_path / "cache"))
    first = oip_proto.descriptor_set(oip_proto.SHARED_PROTO)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_compiler(proto: Path) -> bytes:
        raise AssertionError("compiled again")

    monkeypatch.setattr(oip_proto, "_compile", no_compiler)
    assert oip_proto.descriptor_set(oip_proto.SHARED_PROTO) == first


def test_an_unwritable_cache_still_serves(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A cache folder that cannot be made (under a file: even root cannot) is only skipped.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(oip_proto.CACHE_ENV, str(tmp_path / "file" / "cache"))
    data = oip_proto.descriptor_set(oip_proto.SHARED_PROTO)
    assert b"GRPCInferenceService" in data


def test_messages_live_in_a_private_pool() -> None:
    """Triton's client registers its own `inference.*` in protobuf's global pool; ours do
    not collide with it (both load in one process) and are not the same classes."""
    import tritonclient.grpc.service_pb2 as triton_pb2

    protocol = oip_proto.load()
    ours = protocol.message("ModelInferRequest")
    assert ours is not triton_pb2.ModelInferRequest
    assert [m.name for m in protocol.service.methods][:2] == ["ServerLive", "ServerReady"]
    # Same wire format: Triton's message parses as ours.
    theirs = triton_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"x"])
    assert ours.FromString(theirs.SerializeToString()).model_name == "m"


def test_the_image_build_gets_the_proto_the_server_reads() -> None:
    """The runtime image copies the proto from the `oip-proto` build context, which
    hack/kind-e2e.sh points at the shared data, to where PINNACE_OIP_PROTO says."""
    repo = Path(__file__).resolve().parents[3]
    dockerfile = (repo / "Dockerfile").read_text()
    script = (repo / "hack" / "kind-e2e.sh").read_text()
    [context] = re.findall(r"--build-context oip-proto=(\S+)", script)
    assert (repo / context / oip_proto.PROTO_NAME).resolve() == oip_proto.SHARED_PROTO.resolve()
    copy = re.search(r"COPY --from=oip-proto (\S+) (\S+)", dockerfile)
    assert copy is not None and copy.group(1) == oip_proto.PROTO_NAME
    env = re.search(rf"{oip_proto.PROTO_ENV}=(\S+)", dockerfile.split("AS runtime\n")[1])
    assert env is not None and env.group(1) == copy.group(2) + oip_proto.PROTO_NAME
