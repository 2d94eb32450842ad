"""The ClusterIP Service in front of the runtime pods that serve the API (every pod, or
the leaders of multi-node groups), ports `http`, and `grpc` for the Open Inference
Protocol's gRPC API."""

from __future__ import annotations

from typing import Any

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import labels


def render_service(llmd: LLMDeployment) -> dict[str, Any]:
    port = llmd.spec.serving.port
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.serving_labels(llmd),
            "ports": [
                {
                    "name": names.PORT_NAME,
                    "port": port,
                    "targetPort": names.PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": names.GRPC_PORT_NAME,
                    "port": names.GRPC_PORT,
                    "targetPort": names.GRPC_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": names.GRPC_APP_PROTOCOL,
                },
            ],
        },
    }
    return labels.stamp_applied_hash(service)


def endpoint(llmd: LLMDeployment) -> str:
    """In-cluster base URL of the OpenAI API."""
    return f"http://{llmd.name}.{llmd.namespace}.svc.cluster.local:{llmd.spec.serving.port}/v1"
