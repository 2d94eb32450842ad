"""What the operator tests run against: a Kubernetes API server emulated on kmock, the test's
handle on it (`Cluster`), the real operator in a thread, fake runtime pods, and CRD helpers.

Not importable by name: tests/operator/conftest.py loads this package by path and turns it
into fixtures (its docstring says why). Modules here import each other relatively.
"""

from __future__ import annotations

from . import validation
from .cluster import Cluster
from .crds import (
    KEDA_CRD_PATH,
    KSERVE_CRD_DIR,
    LWS_CRD_PATH,
    REPO,
    SERVICE_MONITOR_CRD_PATH,
    load_crd,
)
from .operator_thread import Operator
from .runtime_pods import FakeRuntime, RuntimePods
from .validation import crd_schema_errors

__all__ = [
    "KEDA_CRD_PATH",
    "KSERVE_CRD_DIR",
    "LWS_CRD_PATH",
    "REPO",
    "SERVICE_MONITOR_CRD_PATH",
    "Cluster",
    "FakeRuntime",
    "Operator",
    "RuntimePods",
    "crd_schema_errors",
    "load_crd",
    "validation",
]
