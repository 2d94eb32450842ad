"""The API emulator answers as a real API server would, where the operator tests rely on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"


def with_typo() -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "minimal-cpu.yaml").read_text())
    body["spec"]["engine"] = {"maxModelLength": 4096}  # the field is maxModelLen
    return dict(body)


def test_an_undeclared_field_is_pruned_or_under_strict_validation_refused(cluster: Any) -> None:
    cluster.apply_crd()
    body = with_typo()
    strict = cluster.http.post(BASE, params={"fieldValidation": "Strict"}, json=body)
    assert strict.status_code == 422 and "spec.engine.maxModelLength" in strict.json()["message"]

    stored = cluster.post(BASE, body)  # the default: stored without it, and on record
    assert stored["spec"]["engine"] == {}
    [(request, fields)] = cluster.api.pruned
    assert (request.method, fields) == ("POST", ["spec.engine.maxModelLength"])
    assert cluster.pruned_writes() == []  # the test's own write: not the operator's


def test_a_schema_or_cel_violation_is_a_422(cluster: Any) -> None:
    cluster.apply_crd()
    body = with_typo()
    body["spec"]["engine"] = {"maxModelLen": "long"}
    answer = cluster.http.post(BASE, json=body)
    assert answer.status_code == 422 and "'long' is not of type 'integer'" in answer.text
    body["spec"]["engine"] = {}
    body["spec"]["autoscaling"] = {"minReplicas": 3, "maxReplicas": 2}
    answer = cluster.http.post(BASE, json=body)
    assert answer.status_code == 422, answer.text
    assert "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" in answer.text  # CEL
