"""What an API server says about a custom resource, given its CRD's structural schema.

Four checks, in the order the API server makes them: the OpenAPI v3 schema (jsonschema's
Draft 4 is its flavour: types, required fields, enums, patterns, int-or-string as anyOf);
fields the schema does not declare, which the server prunes (silently, unless the client
asked for `fieldValidation=Strict`); `x-kubernetes-list-type` set/map uniqueness; and the
`x-kubernetes-validations` CEL rules, evaluated by a real CEL interpreter (cel-python) on the
object with schema defaults filled in, as the server stores it.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import celpy
import jsonschema

_CEL = celpy.Environment()
# Kept on every object and on embedded resources, declared or not.
_ALWAYS_KEPT = ("apiVersion", "kind", "metadata")


def version_schema(crd: dict[str, Any], api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema the CRD serves for `group/version`."""
    group, _, version = api_version.rpartition("/")
    if group != crd["spec"]["group"]:
        raise ValueError(f"{api_version} is not served by {crd['metadata']['name']}")
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return dict(served["schema"]["openAPIV3Schema"])


def crd_schema_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What the API server would say about `obj` given this CRD; empty when it would store
    `obj` as sent. Pruned fields count as errors: we never mean to send a field that is lost."""
    return object_errors(version_schema(crd, obj["apiVersion"]), obj)


def object_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    errors = schema_errors(schema, obj)
    errors += [f"{f}: unknown field" for f in pruned_fields(schema, obj)]
    errors += list_type_errors(schema, obj)
    # CEL rules assume a schema-valid object (the server evaluates them only then).
    return errors or cel_errors(schema, apply_defaults(schema, obj))


def schema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(obj), key=str)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


def _keeps_everything(schema: dict[str, Any], path: str) -> bool:
    # Object metadata is checked by the API server's own rules, not the CRD's schema.
    return bool(schema.get("x-kubernetes-preserve-unknown-fields")) or path == "metadata"


def pruned_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare: what the server drops."""
    if _keeps_everything(schema, path):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        embedded = not path or schema.get("x-kubernetes-embedded-resource")
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if props is not None and key in props:
                out += pruned_fields(props[key], sub, where)
            elif isinstance(extra, dict):
                out += pruned_fields(extra, sub, where)
            elif not (embedded and key in _ALWAYS_KEPT):
                out.append(where)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += pruned_fields(schema["items"], item, f"{path}[{i}]")
    return out


def prune(schema: dict[str, Any], value: Any, path: str = "") -> Any:
    """`value` as the server stores it: without the fields `pruned_fields` reports."""
    if _keeps_everything(schema, path):
        return value
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        embedded = not path or schema.get("x-kubernetes-embedded-resource")
        out = {}
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if props is not None and key in props:
                out[key] = prune(props[key], sub, where)
            elif isinstance(extra, dict):
                out[key] = prune(extra, sub, where)
            elif embedded and key in _ALWAYS_KEPT:
                out[key] = sub
        return out
    if isinstance(value, list) and "items" in schema:
        return [prune(schema["items"], item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def list_type_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Duplicates in a `set` list, or two items of a `map` list with the same keys."""
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema is not None:
                out += list_type_errors(sub_schema, sub, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        list_type = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for i, item in enumerate(value):
            identity = item if list_type == "set" else {k: item.get(k) for k in keys}
            if list_type in ("set", "map"):
                token = json.dumps(identity, sort_keys=True)
                if token in seen:
                    out.append(f"{path}[{i}]: Duplicate value: {token}")
                seen.add(token)
            out += list_type_errors(schema["items"], item, f"{path}[{i}]")
    return out


@functools.cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


@functools.lru_cache(maxsize=4096)
def _holds(rule: str, value: str) -> bool:
    # Keyed by the value's JSON: a status write leaves the spec's rules a cache hit
    # (cel-python takes milliseconds per rule, and the emulator checks every write).
    return bool(_program(rule).evaluate({"self": celpy.json_to_cel(json.loads(value))}))


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Each failing `x-kubernetes-validations` rule as 'path: message'."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: there is no old object on create
        if not _holds(rule["rule"], json.dumps(value, sort_keys=True)):
            errors.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}.{i}")
    return errors


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: schema defaults filled in where the parent exists."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value
