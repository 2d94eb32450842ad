"""helm/pinnace: `helm lint --strict` and `helm template` (via helm-python-sdk, Helm's Go SDK
with no helm binary), every rendered object validated, and the chart kept equal to the
single sources it repeats (crds/, deploy/rbac.yaml, the kustomize KServe overlay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pinnace"
K8S_VERSION = kubernetes_validate.latest_version()

VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "kserve": {
        "kserve": {"clusterServingRuntime": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "namespaced": {"watchNamespaces": ["ml", "research"], "serviceAccount": {"name": "llm-op"}},
    "standalone": {"peering": {"enabled": False}, "replicaCount": 1},
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """`helm template pinnace helm/pinnace -n pinnace-system` as objects (CRDs first)."""
    out = [doc for c in chart.crds for doc in yaml.safe_load_all(c["data"]) if doc]
    manifests = chart.render(values, name="pinnace", namespace="pinnace-system")
    for path, text in sorted(manifests.items()):
        if not path.endswith("NOTES.txt"):
            out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


@pytest.mark.parametrize("case", sorted(VALUES))
def test_helm_lint_strict(case: str) -> None:
    report = helm.lint(CHART, values=VALUES[case], strict=True, namespace="pinnace-system")
    assert report["errors"] == []
    # Strict: warnings fail too. Only info-level hints (e.g. "icon is recommended") remain.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(VALUES))
def test_every_rendered_object_validates(
    chart: Any,
    case: str,
    kserve_crds: dict[str, Any],
    service_monitor_crd: dict[str, Any],
    schema_errors: Any,
) -> None:
    custom = {
        "ClusterServingRuntime": kserve_crds["ClusterServingRuntime"],
        "ServiceMonitor": service_monitor_crd,
    }
    kopf = {
        crd["spec"]["names"]["kind"]: crd
        for crd in yaml.safe_load_all((REPO / "crds" / "kopf.dev_peerings.yaml").read_text())
    }
    objects = render(chart, VALUES[case])
    for obj in objects:
        kind = obj["kind"]
        if kind in custom:
            assert schema_errors(custom[kind], obj) == [], kind
        elif obj["apiVersion"] == "kopf.dev/v1":
            assert schema_errors(kopf[kind], obj) == [], kind
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    }
    assert ("ClusterServingRuntime" in kinds) == (case == "kserve")
    assert ("ServiceMonitor" in kinds) == (case == "kserve")


def test_chart_crds_are_the_repos_crds(chart: Any) -> None:
    # Symlinks into crds/ (Helm follows them when loading and packaging): one source.
    for link in (CHART / "crds").iterdir():
        assert link.is_symlink() and link.resolve().parent == REPO / "crds"
    shipped = sorted(c["data"] for c in chart.crds)
    expected = sorted(p.read_text() for p in (REPO / "crds").glob("*.yaml"))
    assert shipped == expected and len(shipped) == 2  # ours and kopf's peering CRDs


def test_rbac_is_deploy_rbac(chart: Any) -> None:
    [role] = by_kind(render(chart, {}))["ClusterRole"]
    deploy = yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text())
    [expected] = [d for d in deploy if d["kind"] == "ClusterRole"]
    assert role["rules"] == expected["rules"]


def test_operator_pod_is_deploys_pod(chart: Any) -> None:
    [dep] = by_kind(render(chart, {}))["Deployment"]
    [expected] = [
        d
        for d in yaml.safe_load_all((REPO / "deploy" / "operator.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    pod, want = dep["spec"]["template"]["spec"], expected["spec"]["template"]["spec"]
    assert pod["securityContext"] == want["securityContext"]
    [c], [w] = pod["containers"], want["containers"]
    for key in ("image", "command", "securityContext", "livenessProbe", "ports", "resources"):
        assert c[key] == w[key], key
    assert dep["spec"]["replicas"] == expected["spec"]["replicas"] == 2
    [account] = by_kind(render(chart, {}))["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_install_watches_and_peers_per_namespace(chart: Any) -> None:
    objects = by_kind(render(chart, VALUES["namespaced"]))
    [dep] = objects["Deployment"]
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:6] == ["pinnace", "operator", "--namespace", "ml", "--namespace", "research"]
    assert "--all-namespaces" not in command
    peerings = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in objects["KopfPeering"]}
    assert peerings == {("ml", "pinnace"), ("research", "pinnace")}
    assert "ClusterKopfPeering" not in objects
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "llm-op"
    [binding] = objects["ClusterRoleBinding"]
    assert binding["subjects"][0]["name"] == "llm-op"


def test_standalone_runs_one_replica_without_peering(chart: Any) -> None:
    objects = by_kind(render(chart, VALUES["standalone"]))
    command = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--standalone" in command and "--peering" not in command
    assert "ClusterKopfPeering" not in objects
    with pytest.raises(helm.HelmRenderError, match=r"replicaCount > 1 needs peering\.enabled"):
        chart.render({"peering": {"enabled": False}}, name="pinnace", namespace="pinnace-system")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"imageTag": "0.2.0"}, "imageTag"),  # a typo of image.tag
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"watchNamespaces": ["ML"]}, "/watchNamespaces/0"),
        (
            {"metrics": {"serviceMonitor": {"interval": "often"}}},
            "/metrics/serviceMonitor/interval",
        ),
    ],
)
def test_values_schema_rejects_mistakes(chart: Any, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=complaint):
        chart.validate_schema(values)


def test_notes_point_at_files_that_exist(chart: Any) -> None:
    notes = chart.render({}, name="pinnace", namespace="pinnace-system")[
        "pinnace/templates/NOTES.txt"
    ]
    for word in notes.split():
        if word.startswith("examples/"):
            assert (REPO / word).is_file(), word
    example = yaml.safe_load((REPO / "examples" / "minimal-cpu.yaml").read_text())
    assert f"llmd/{example['metadata']['name']}" in notes
    assert f'"model": "{example["spec"]["model"]["servedName"]}"' in notes


def test_service_monitor_scrapes_the_services_the_operator_renders(chart: Any) -> None:
    from pinnace.operator.llmdeployment import parse_llmdeployment
    from pinnace.operator.render import render_service

    [monitor] = by_kind(render(chart, VALUES["kserve"]))["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    example = yaml.safe_load((REPO / "examples" / "autoscaling.yaml").read_text())
    service = render_service(parse_llmdeployment(example))
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics" and monitor["spec"]["namespaceSelector"] == {"any": True}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda e: e.update(intervall="30s"), "spec.endpoints[0].intervall: unknown field"),
        (lambda e: e.update(interval="often"), "'often' does not match"),
        (lambda e: e.update(scheme="ftp"), "'ftp' is not one of"),
    ],
    ids=["pruned", "bad-interval", "bad-scheme"],
)
def test_the_prometheus_operators_crd_refuses_a_broken_service_monitor(
    chart: Any, change: Any, error: str, service_monitor_crd: dict[str, Any], schema_errors: Any
) -> None:
    """The checks are not vacuous: each broken variant of the rendered monitor is refused."""
    [monitor] = by_kind(render(chart, VALUES["kserve"]))["ServiceMonitor"]
    change(monitor["spec"]["endpoints"][0])
    errors = schema_errors(service_monitor_crd, monitor)
    assert any(error in e for e in errors), errors
