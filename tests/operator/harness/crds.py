"""Where the CRDs come from: ours, KServe's (shared test data), KEDA's, LeaderWorkerSet's
and the Prometheus operator's (vendored test data, see each folder's SOURCE.txt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "pinnace.dev_llmdeployments.yaml"
# KServe's own CRDs (shared test data, never copied into the repo; missing is a failure).
KSERVE_CRD_DIR = REPO.parent / "shared" / "data" / "kserve-v0.20.0" / "crd"
# Upstream release CRDs, copied verbatim (source, tag, commit and license beside them).
DATA = Path(__file__).resolve().parents[1] / "data"
KEDA_CRD_PATH = DATA / "keda" / "keda.sh_scaledobjects.yaml"
LWS_CRD_PATH = DATA / "lws" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
SERVICE_MONITOR_CRD_PATH = (
    DATA / "prometheus-operator" / "monitoring.coreos.com_servicemonitors.yaml"
)


def load_crd(path: Path) -> dict[str, Any]:
    # KServe's CRDs are megabytes of YAML: libyaml's loader where present, it is far faster.
    return dict(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
