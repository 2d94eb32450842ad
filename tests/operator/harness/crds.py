"""Where the CRDs come from, and what an API server would say about a custom resource."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "pinnace.dev_llmdeployments.yaml"
# KServe's own CRDs (shared test data, never copied into the repo); tests skip without them.
KSERVE_CRD_DIR = REPO.parent / "shared" / "data" / "kserve-v0.20.0" / "crd"
# No KEDA CRD is available offline: a hand-written schema of the ScaledObject fields we use.
KEDA_CRD_PATH = Path(__file__).parents[1] / "data" / "keda" / "scaledobjects.keda.sh.yaml"


def load_crd(path: Path) -> dict[str, Any]:
    # KServe's CRDs are megabytes of YAML: libyaml's loader where present, it is far faster.
    return dict(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def stand_in_crd(kind: str, plural: str, version: str) -> dict[str, Any]:
    """A KServe CRD without KServe's schema: it serves the kind and accepts any spec/status."""
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = {"type": "object", "properties": {"spec": free, "status": free}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.serving.kserve.io"},
        "spec": {
            "group": "serving.kserve.io",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def pruned_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare: the API server would drop
    them silently, so a typo in a rendered custom resource shows up here instead."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == "metadata":
        return []  # object metadata is validated by the API server's own rules
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue  # kept on every object, declared or not
            if props is not None and key in props:
                out += pruned_fields(props[key], sub, where)
            elif isinstance(extra, dict):
                out += pruned_fields(extra, sub, where)
            else:
                out.append(where)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += pruned_fields(schema["items"], item, f"{path}[{i}]")
    return out


def crd_schema_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What the API server would say about `obj` given this CRD: schema errors, then fields
    it would prune (reported here as errors: we never mean to send a field that is lost)."""
    [version] = [v for v in crd["spec"]["versions"] if obj["apiVersion"].endswith(v["name"])]
    schema = version["schema"]["openAPIV3Schema"]
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(obj)
    ]
    return errors + [f"{f}: unknown field" for f in pruned_fields(schema, obj)]
