"""Generate the `llmdeployments.pinnace.dev` CRD from the pydantic models.

The committed `crds/` YAML is this function's output (a test keeps them equal):
`pinnace render --crd > crds/pinnace.dev_llmdeployments.yaml`.

pydantic emits JSON Schema 2020-12; a CRD wants a *structural* OpenAPI v3 schema, so
`_structural` inlines `$ref`s, turns `anyOf: [X, null]` into an optional X, uses the
boolean form of `exclusiveMinimum`, writes `const` as a one-value `enum`, and drops what
the API server refuses (`additionalProperties: false`, titles, `default: null`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pinnace.operator import names
from pinnace.operator.llmdeployment import METADATA_NAME_RULE
from pinnace.operator.spec import LLMDeploymentSpec
from pinnace.operator.status import LLMDeploymentStatus

_DROP = {"title", "additionalProperties"}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model (camelCase, refs inlined)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:  # Optional[X]: absence is the null
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return _structural({**branches[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs" or (key == "default" and value is None):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "const":  # a one-value Literal; structural schemas have no const
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _structural(value, defs)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("type", "object")
    return out


def _status_schema() -> dict[str, Any]:
    schema = model_schema(LLMDeploymentStatus)
    conditions = schema["properties"]["conditions"]
    # Merge conditions by type, the way `kubectl` and SSA expect Kubernetes conditions.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    # Observed, not .spec.replicas: with autoscaling the spec has no count.
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The full CustomResourceDefinition object."""
    schema = {
        "type": "object",
        "description": "An LLM served by the Pinnace runtime behind an OpenAI-compatible API.",
        "required": ["spec"],
        "x-kubernetes-validations": [
            {"rule": METADATA_NAME_RULE.cel, "message": METADATA_NAME_RULE.message}
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(LLMDeploymentSpec),
            "status": _status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names.PLURAL}.{names.GROUP}"},
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": list(names.SHORT_NAMES),
                "categories": ["pinnace"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }
