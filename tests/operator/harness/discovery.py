"""What the emulated API server serves, and how it checks what it is sent.

The built-in resources the operator reads and writes are always there. A custom resource is
served once its CRD is created (as on a real cluster, where discovery lists it from then on),
and its objects are checked as a real API server checks them (validation.py): a schema, list
type or CEL violation is a 422; a field the schema does not declare is pruned from what is
stored (a 422 only under `fieldValidation=Strict`), and every pruning is on record.
"""

from __future__ import annotations

from typing import Any

import attrs
import kmock
from kmock._internal import k8s

from . import validation

BUILTINS = {
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status"}),
    "v1/services": dict(kind="Service", namespaced=True, subresources={"status"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status"}),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    "v1/events": dict(kind="Event", namespaced=True),
    "policy/v1/poddisruptionbudgets": dict(
        kind="PodDisruptionBudget", namespaced=True, subresources={"status"}
    ),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "autoscaling/v2/horizontalpodautoscalers": dict(
        kind="HorizontalPodAutoscaler", namespaced=True, subresources={"status"}
    ),
    # Discovery only: kopf waits to see it exists (it never lists it with scanning disabled).
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", namespaced=False
    ),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


@attrs.define(kw_only=True)
class Discovery(k8s.KubernetesEmulator):
    """kmock's emulator with the built-ins registered and CRDs turned into served resources."""

    _schemas: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)
    # (request, fields) for each object the server stored without fields it was sent.
    pruned: list[tuple[kmock.Request, list[str]]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in BUILTINS.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
            self.resources[key] = kmock.ResourceInfo(
                kind=spec["names"]["kind"],
                singular=spec["names"]["singular"],
                shortnames=set(spec["names"].get("shortNames", [])),
                namespaced=spec["scope"] == "Namespaced",
                subresources=set(version.get("subresources", {})),
                verbs=VERBS,
            )
            self._schemas[kmock.resource(key)] = version["schema"]["openAPIV3Schema"]

    def _admit(self, request: kmock.Request, obj: dict[str, Any]) -> dict[str, Any]:
        """`obj` as the server stores it, or a 422 (k8s.KubernetesError) if it is invalid."""
        schema = self._schemas.get(request.resource)
        if schema is None:
            return obj
        errors = validation.schema_errors(schema, obj) + validation.list_type_errors(schema, obj)
        errors = errors or validation.cel_errors(schema, validation.apply_defaults(schema, obj))
        pruned = validation.pruned_fields(schema, obj)
        if pruned and request.params.get("fieldValidation") == "Strict":
            errors += [f'{field}: unknown field "{field}"' for field in pruned]
        if errors:
            raise k8s.KubernetesError(status=422, reason="Invalid", message=errors[0])
        if pruned:
            self.pruned.append((request, pruned))
            obj = validation.prune(schema, obj)
        return obj
