"""Rendered pods serve the Open Inference Protocol over gRPC on 8081 beside HTTP, as
KServe's runtimes do; readiness stays on HTTP; Knative (one port) gets HTTP only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.cli.main import build_parser
from pinnace.operator import names
from pinnace.operator.llmdeployment import SpecError, parse_llmdeployment
from pinnace.operator.render import render_all

REPO = Path(__file__).resolve().parents[2]


def render(example: str, **spec: Any) -> dict[str, dict[str, Any]]:
    body = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec))
    return {o["kind"]: o for o in render_all(parse_llmdeployment(body))}


def pod_container(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "ServingRuntime":
        [container] = obj["spec"]["containers"]
    else:
        [container] = obj["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_deployment_serves_grpc_and_its_service_exposes_it() -> None:
    objects = render("minimal-cpu")
    container = pod_container(objects["Deployment"])
    # The flag `pinnace serve` really parses, with the port the container declares.
    args = build_parser().parse_args(container["args"])
    assert args.grpc_port == names.GRPC_PORT == 8081
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["ports"][0]["name"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    service = objects["Service"]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    for obj in (objects["Deployment"], service):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_kserve_raw_deployment_declares_both_protocols(
    kserve_crds: dict[str, Any], schema_errors: Any
) -> None:
    runtime = render("kserve")["ServingRuntime"]
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    container = pod_container(runtime)
    assert [p["name"] for p in container["ports"]] == ["http1", "grpc"]
    assert build_parser().parse_args(container["args"]).grpc_port == 8081
    assert container["readinessProbe"]["httpGet"]["port"] == 8000
    assert schema_errors(kserve_crds["ServingRuntime"], runtime) == []


def test_kserve_serverless_keeps_one_http_port() -> None:
    runtime = render("kserve-serverless")["ServingRuntime"]
    container = pod_container(runtime)
    assert [p["name"] for p in container["ports"]] == ["http1"]
    assert "--grpc-port" not in container["args"]
    assert "grpc-v2" not in runtime["spec"]["protocolVersions"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"serving": {"port": 8081}}, "serving.port 8081 is the runtime's gRPC port"),
        ({"engine": {"extraArgs": ["--grpc-port", "9000"]}}, "--grpc-port is set by the operator"),
    ],
)
def test_the_grpc_port_is_the_operators(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError, match=needle.replace(".", r"\.")):
        render("minimal-cpu", **spec)
