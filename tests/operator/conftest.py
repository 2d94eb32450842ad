"""Fixtures: a Kubernetes API emulator (kmock on 127.0.0.1) and the real kopf operator.

The code behind them lives in harness/, one file per concern: the emulated API server in
layers (discovery.py, objects.py, apply.py, api_server.py), what an API server says about a
custom resource (validation.py), the test's `Cluster` handle (cluster.py) and the operator's
log stamped with request sequence numbers (operator_log.py), the operator in a thread
(operator_thread.py), fake runtime pods (runtime_pods.py) and where the CRDs come from
(crds.py). This file only turns it into fixtures.

Why harness/ is loaded by path, below: tests run with `--import-mode=importlib` (pyproject),
under which pytest puts no test folder on `sys.path`, and its docs say helper modules in test
folders are not importable. `pytest_plugins` would need an importable module name too, and is
refused outside the root conftest. A relative import from here works with today's pytest, but
only because pytest 8.3.4 and later happen to import a conftest's folders as namespace
packages: undocumented, and pyproject allows any pytest 8. So this file loads harness/ itself
with the standard library's recipe for importing a source file directly, as a package named
`operator_harness`: pytest version and import mode do not matter, and the harness's modules
import each other relatively as in any package.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes
import pytest
import yaml

from pinnace.operator.client import HttpKubeClient


def _load_harness() -> ModuleType:
    name, folder = "operator_harness", Path(__file__).parent / "harness"
    # Its asserts (a POST that must succeed, ...) then fail with pytest's detail, as they
    # did when this code was in conftest.py: the hook rewrites the modules as they import.
    pytest.register_assert_rewrite(name)
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its relative imports look it up there
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


@pytest.fixture
def cluster() -> Iterator[harness.Cluster]:
    c = harness.Cluster()
    try:
        yield c
        assert c.pruned_writes() == []  # the operator never sends a field that is lost
    finally:
        c.close()


@pytest.fixture
def start_operator(cluster: harness.Cluster) -> Iterator[Any]:
    started: list[harness.Operator] = []

    def start(namespaces: list[str] | None = None) -> harness.Operator:
        op = harness.Operator(cluster.url, namespaces or ["ml"])
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


@pytest.fixture(scope="session")
def kserve_crds() -> dict[str, dict[str, Any]]:
    """KServe v0.20.0's InferenceService, ServingRuntime and ClusterServingRuntime CRDs."""
    crds = {}
    for plural in ("inferenceservices", "servingruntimes", "clusterservingruntimes"):
        crd = harness.load_crd(harness.KSERVE_CRD_DIR / f"full_serving.kserve.io_{plural}.yaml")
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


@pytest.fixture(scope="session")
def kserve_api_crds(kserve_crds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The CRDs that register KServe's API in the emulator."""
    return [kserve_crds["InferenceService"], kserve_crds["ServingRuntime"]]


@pytest.fixture(scope="session")
def keda_crd() -> dict[str, Any]:
    """KEDA v2.20.2's ScaledObject CRD (data/keda/SOURCE.txt)."""
    return harness.load_crd(harness.KEDA_CRD_PATH)


@pytest.fixture(scope="session")
def lws_crd() -> dict[str, Any]:
    """LeaderWorkerSet v0.10.0's CRD (data/lws/SOURCE.txt)."""
    return harness.load_crd(harness.LWS_CRD_PATH)


@pytest.fixture(scope="session")
def service_monitor_crd() -> dict[str, Any]:
    """Prometheus operator v0.93.0's ServiceMonitor CRD (data/prometheus-operator/SOURCE.txt)."""
    return harness.load_crd(harness.SERVICE_MONITOR_CRD_PATH)


@pytest.fixture(scope="session")
def schema_errors() -> Any:
    """`schema_errors(crd, obj) -> list[str]`, empty when the API server would store obj as
    sent: schema, required fields, no field it would prune, list types and CEL rules."""
    return harness.crd_schema_errors


@pytest.fixture(scope="session")
def crd_validation() -> Any:
    """The API server's checks one by one (harness/validation.py)."""
    return harness.validation


@pytest.fixture
def kube_client(cluster: harness.Cluster) -> HttpKubeClient:
    """The operator's own client, pointed at the emulator."""
    config = kubernetes.client.Configuration(host=cluster.url)
    return HttpKubeClient(kubernetes.client.ApiClient(config))


@pytest.fixture
def create_llmd(cluster: harness.Cluster) -> Any:
    """Create an LLMDeployment from examples/NAME.yaml (CRD applied first), return its path."""
    cluster.apply_crd()

    def create(name: str, *, namespace: str = "ml", **spec: Any) -> str:
        body = yaml.safe_load((harness.REPO / "examples" / f"{name}.yaml").read_text())
        body["metadata"]["namespace"] = namespace
        body["spec"].update(spec)
        base = f"/apis/pinnace.dev/v1alpha1/namespaces/{namespace}/llmdeployments"
        cluster.post(base, body)
        return f"{base}/{body['metadata']['name']}"

    return create


@pytest.fixture
def runtime_pods(cluster: harness.Cluster, tmp_path: Path) -> Iterator[harness.RuntimePods]:
    pods = harness.RuntimePods(cluster, tmp_path / "podfs")
    try:
        yield pods
    finally:
        pods.close()


@pytest.fixture
def runtime_servers(tmp_path: Path) -> Iterator[harness.RuntimePods]:
    """Fake runtime HTTP servers without an API server (`serve()`), for client tests."""
    servers = harness.RuntimePods(None, tmp_path / "podfs")
    try:
        yield servers
    finally:
        servers.close()
