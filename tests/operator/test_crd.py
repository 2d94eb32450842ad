"""The committed CRD is exactly what the pydantic model generates, and a valid structural CRD."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from pinnace.cli.render import CRD_HEADER, to_yaml
from pinnace.operator.crd import build_crd
from pinnace.operator.spec import LLMDeploymentSpec, SpecModel

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "pinnace.dev_llmdeployments.yaml"


def test_committed_crd_is_the_generated_one() -> None:
    # Regenerate with: pinnace render --crd > crds/pinnace.dev_llmdeployments.yaml
    assert CRD_FILE.read_text() == CRD_HEADER + to_yaml([build_crd()])


def test_crd_is_a_valid_customresourcedefinition() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["shortNames"]) == (
        "pinnace.dev",
        "Namespaced",
        ["llmd"],
    )
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Model", "Ready", "Replicas"] and {"Endpoint", "Age"} <= set(columns)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{key}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path}: every node needs a type in a structural schema"
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "$defs"):
            assert banned not in node, f"{path}: {banned}"
        assert node.get("additionalProperties", {}) is not False, path
        if node["type"] == "object" and "properties" not in node and path != ".metadata":
            assert "additionalProperties" in node or node.get(
                "x-kubernetes-preserve-unknown-fields"
            ), f"{path}: a free-form object must say so"


def _nested(annotation: Any, path: str) -> list[tuple[type[SpecModel], str]]:
    """Spec models inside a field's type: X, X | None, list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, SpecModel):
        return [(annotation, path)]
    if typing.get_origin(annotation) is list:
        return _nested(typing.get_args(annotation)[0], path + "[]")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _nested(arg, path)]
    return []


def _fields(model: type[SpecModel], prefix: str) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        out.add(path)
        for sub, sub_path in _nested(field.annotation, path):
            out |= _fields(sub, sub_path)
    return out


def test_every_model_field_is_in_the_crd_and_nothing_else() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    crd_paths = {p for p, _ in _walk(schema["properties"]["spec"], ".spec") if p != ".spec"}
    crd_paths = {p for p in crd_paths if not p.endswith(("{}", "[]"))}
    assert crd_paths == _fields(LLMDeploymentSpec, ".spec")
    # The fields the issue names, spot-checked by path.
    for path in (
        ".spec.model.revision",
        ".spec.model.credentialsSecretRef",
        ".spec.engine.quantization",
        ".spec.engine.quantizeLmHead",
        ".spec.engine.kvCacheDtype",
        ".spec.engine.runner",
        ".spec.engine.maxNumSeqs",
        ".spec.engine.tensorParallelSize",
        ".spec.engine.env",
        ".spec.adapters",
        ".spec.serving.port",
        ".spec.serving.apiKeySecretRef",
        ".spec.storage.cache",
        ".spec.image",
    ):
        assert path in crd_paths
