"""Every Kubernetes kind the operator touches, and what it does with each: one table.

The client's URL paths (`client.object_path`), the children pruned by name when the spec
stops asking for them (`PRUNABLE`), the children whose events trigger a reconcile
(`WATCHED`) and the RBAC rules (deploy/rbac.yaml and the Helm chart's copy, checked by
tests/operator/test_children.py) all come from here, so adding a child is one row.

Renderers may import this module (it imports nothing of the controller).
"""

from __future__ import annotations

from dataclasses import dataclass

from pinnace.operator import names

Verb = str  # an RBAC verb: get, list, watch, create, patch, delete


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    plural: str
    verbs: frozenset[Verb]
    # Deleted (by name, if this resource owns it) once the spec no longer renders it.
    prune: bool = False
    # Its events (labelled managed-by the operator) trigger a pass of its owner.
    watch: bool = False
    # Subresource -> verbs (status written by the operator, e.g. a pod's readiness gate).
    subresources: tuple[tuple[str, frozenset[Verb]], ...] = ()
    # What installs its API, for a kind that is not built into Kubernetes.
    installed_by: str = ""

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


def _verbs(*verbs: str) -> frozenset[Verb]:
    return frozenset(verbs)


# Server-side apply needs create + patch; drift detection get; pruning delete; a watch
# list + watch. The weights cache PVC is never deleted by the operator (it goes with its
# owner). Prune order: what references others goes first.
_APPLIED = ("get", "create", "patch")
_PRUNED = (*_APPLIED, "delete")
_WATCHED = (*_PRUNED, "list", "watch")

KINDS: tuple[Kind, ...] = (
    Kind(
        "InferenceService",
        f"{names.KSERVE_GROUP}/v1beta1",
        "inferenceservices",
        _verbs(*_WATCHED),
        prune=True,
        watch=True,  # status mirrors its Ready condition
        installed_by="KServe",
    ),
    Kind(
        "ServingRuntime",
        f"{names.KSERVE_GROUP}/v1alpha1",
        "servingruntimes",
        _verbs(*_PRUNED),
        prune=True,
        installed_by="KServe",
    ),
    Kind(
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
        "horizontalpodautoscalers",
        _verbs(*_PRUNED),
        prune=True,
    ),
    Kind(
        "ScaledObject",
        "keda.sh/v1alpha1",
        "scaledobjects",
        _verbs(*_PRUNED),
        prune=True,
        installed_by="KEDA",
    ),
    Kind(
        "PodDisruptionBudget",
        "policy/v1",
        "poddisruptionbudgets",
        _verbs(*_PRUNED),
        prune=True,
    ),
    Kind(
        "NetworkPolicy",
        "networking.k8s.io/v1",
        "networkpolicies",
        _verbs(*_PRUNED),
        prune=True,
    ),
    Kind("Deployment", "apps/v1", "deployments", _verbs(*_WATCHED), prune=True, watch=True),
    # Multi-node replicas (a group of pods each) instead of the Deployment.
    Kind(
        names.LWS_KIND,
        names.LWS_API_VERSION,
        "leaderworkersets",
        _verbs(*_WATCHED),
        prune=True,
        watch=True,  # status mirrors its ready groups
        installed_by="LeaderWorkerSet (github.com/kubernetes-sigs/lws)",
    ),
    Kind("Service", "v1", "services", _verbs(*_WATCHED), prune=True, watch=True),
    Kind("PersistentVolumeClaim", "v1", "persistentvolumeclaims", _verbs(*_APPLIED)),
    # Adapter fetches: names of their own, pruned by label (`render.adapters`).
    Kind("Job", "batch/v1", "jobs", _verbs(*_WATCHED), watch=True),
    # Runtime pods: found by label and watched (handlers.pod_event); only the adapter
    # readiness gate's condition in their status is ever written.
    Kind(
        "Pod",
        "v1",
        "pods",
        _verbs("list", "watch"),
        subresources=(("status", _verbs("patch")),),
    ),
    Kind("Secret", "v1", "secrets", _verbs("get")),  # serving.apiKeySecretRef
    Kind(
        names.KIND,
        names.API_VERSION,
        names.PLURAL,
        _verbs("get", "list", "watch", "patch"),  # kopf's bookkeeping annotations
        subresources=(("status", _verbs("patch")),),
    ),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}
PRUNABLE: tuple[str, ...] = tuple(k.kind for k in KINDS if k.prune)
WATCHED: tuple[Kind, ...] = tuple(k for k in KINDS if k.watch)


def rbac_grants() -> set[tuple[str, str, Verb]]:
    """(apiGroup, resource[/subresource], verb) for every request the table implies."""
    out = set()
    for k in KINDS:
        out |= {(k.group, k.plural, v) for v in k.verbs}
        for sub, verbs in k.subresources:
            out |= {(k.group, f"{k.plural}/{sub}", v) for v in verbs}
    return out
