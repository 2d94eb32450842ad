"""What the operator tests run against: a Kubernetes API server emulated on kmock, the test's
handle on it (`Cluster`), the real operator in a thread, fake runtime pods, and CRD helpers.

Not importable by name: tests/operator/conftest.py loads this package by path and turns it
into fixtures (its docstring says why). Modules here import each other relatively.
"""

from __future__ import annotations

from .cluster import Cluster
from .crds import KEDA_CRD_PATH, KSERVE_CRD_DIR, REPO, crd_schema_errors, load_crd, stand_in_crd
from .operator_thread import Operator
from .runtime_pods import FakeRuntime, RuntimePods

__all__ = [
    "KEDA_CRD_PATH",
    "KSERVE_CRD_DIR",
    "REPO",
    "Cluster",
    "FakeRuntime",
    "Operator",
    "RuntimePods",
    "crd_schema_errors",
    "load_crd",
    "stand_in_crd",
]
