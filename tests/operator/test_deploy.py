"""deploy/: RBAC without wildcards covering every request the operator makes; a locked-down pod."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def rules() -> list[dict[str, Any]]:
    [role] = [d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole"]
    return list(role["rules"])


@pytest.mark.parametrize("name", ["rbac.yaml", "operator.yaml", "peering.yaml"])
def test_manifests_are_valid_kubernetes(name: str) -> None:
    for doc in docs(name):
        if doc["apiVersion"].startswith("kopf.dev/"):
            continue  # a custom resource of kopf's own CRD (validated by the API server)
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_rbac_has_no_wildcards_and_binds_the_service_account() -> None:
    for rule in rules():
        for key in ("apiGroups", "resources", "verbs"):
            assert rule[key] and "*" not in rule[key] and not any("*" in v for v in rule[key])
        assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "patch"}
    by_kind = {d["kind"]: d for d in docs("rbac.yaml")}
    account = by_kind["ServiceAccount"]["metadata"]
    binding = by_kind["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    # Never: secrets (downloads read them through the pod's env, not the API), pods, delete.
    granted = {r for rule in rules() for r in rule["resources"]}
    assert not granted & {"secrets", "pods", "configmaps"}


def test_operator_pod_runs_non_root_with_a_read_only_root() -> None:
    [dep] = [d for d in docs("operator.yaml") if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    [sa] = [d for d in docs("rbac.yaml") if d["kind"] == "ServiceAccount"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    [c] = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["command"][:2] == ["pinnace", "operator"] and "--all-namespaces" in c["command"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def verbs(request: Any) -> set[str]:
    """The RBAC verbs the API server checks for a request."""
    if request.method == "GET":
        if request.params.get("watch") == "true":
            return {"watch"}
        return {"get"} if request.name else {"list"}
    if request.method == "PATCH" and request.action == kmock.action.CREATE:
        return {"patch", "create"}  # server-side apply of an absent object creates it
    return {
        {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method]
    }


def test_rbac_covers_every_request_the_operator_makes(
    cluster: Any, create_llmd: Any, start_operator: Any
) -> None:
    start_operator()
    path = create_llmd("gpu")  # PVC + Service + Deployment
    bad = create_llmd("minimal-cpu", engine={"extraArgs": ["--port", "1"]})  # Degraded
    dep = "/apis/apps/v1/namespaces/ml/deployments/qwen-chat"
    deadline = time.monotonic() + 15
    while cluster.get(dep) is None or "status" not in (cluster.get(bad) or {}):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster.patch(path, {"spec": {"replicas": 2, "engine": {"dtype": "float16"}}})
    cluster.patch(dep + "/status", {"status": {"readyReplicas": 2, "replicas": 2}})
    while cluster.get(path).get("status", {}).get("readyReplicas") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster.http.delete(path)
    time.sleep(1)

    used = set()
    for request in cluster.requests():
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        if agent == "pinnace-tests" or request.resource is None or not request.resource.plural:
            continue  # the test itself, or discovery (allowed to every authenticated user)
        resource = request.resource.plural
        if request.subresource:
            resource += f"/{request.subresource}"
        used |= {(request.resource.group, resource, v) for v in verbs(request)}
    granted = {
        (g, r, v)
        for rule in rules()
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert used, "the scenario made no requests"
    assert used <= granted, sorted(used - granted)
    # The scenario exercised the core of what the role grants.
    for needed in [
        ("pinnace.dev", "llmdeployments", "watch"),
        ("pinnace.dev", "llmdeployments/status", "patch"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("", "services", "get"),
        ("", "persistentvolumeclaims", "create"),
        ("", "events", "create"),
    ]:
        assert needed in used, needed
