"""Autoscaling renders (HPA and KEDA ScaledObject), field by field, for each metric combination.

The HPA is validated by kubernetes-validate (strict). ScaledObjects are checked against KEDA's
own CRD from its v2.20.2 release (data/keda/): schema, required fields, CEL rules, and no
field the API server would prune.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import render_all, render_autoscaler, render_deployment
from pinnace.operator.render.autoscaling import SIGNALS, quantity

REPO = Path(__file__).resolve().parents[2]
METRICS = ("requestsWaiting", "kvCacheUsage", "requestsRunning", "cpu")
# Every non-empty combination of the four signals (15), each with both engines.
COMBINATIONS = [c for n in range(1, 5) for c in itertools.combinations(METRICS, n)]
TARGETS = {"requestsWaiting": 3, "kvCacheUsage": 0.75, "requestsRunning": 12, "cpu": 70}
SERIES = {
    "requestsWaiting": "pinnace:num_requests_waiting",
    "kvCacheUsage": "pinnace:kv_cache_usage_perc",
    "requestsRunning": "pinnace:num_requests_running",
}


def llmd_with(autoscaling: dict[str, Any]) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / "autoscaling.yaml").read_text())
    body["spec"]["autoscaling"] = copy.deepcopy(autoscaling)
    return parse_llmdeployment(body)


def scaling(engine: str, metrics: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    return {
        "engine": engine,
        "minReplicas": 1,
        "maxReplicas": 5,
        "metrics": [{"metric": m, "target": TARGETS[m]} for m in metrics],
        "scaleDownDelaySeconds": 240,
        **extra,
    }


@pytest.mark.parametrize("metrics", COMBINATIONS, ids="+".join)
def test_hpa_for_each_metric_combination(metrics: tuple[str, ...]) -> None:
    hpa = render_autoscaler(llmd_with(scaling("hpa", metrics)))
    assert hpa is not None
    kubernetes_validate.validate(hpa, kubernetes_validate.latest_version(), strict=True)
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "qwen-autoscaled",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 5)
    assert spec["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 240}}
    # One HPA metric per signal, in order; the HPA scales to the largest proposal.
    assert len(spec["metrics"]) == len(metrics)
    for name, metric in zip(metrics, spec["metrics"], strict=True):
        if name == "cpu":
            assert metric == {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        else:
            assert metric == {
                "type": "Pods",
                "pods": {
                    # prometheus-adapter serves pinnace:x as pinnace_x.
                    "metric": {"name": SERIES[name].replace(":", "_")},
                    "target": {"type": "AverageValue", "averageValue": quantity(TARGETS[name])},
                },
            }


@pytest.mark.parametrize("metrics", COMBINATIONS, ids="+".join)
def test_scaled_object_for_each_metric_combination(
    metrics: tuple[str, ...], keda_crd: dict[str, Any], schema_errors: Any
) -> None:
    url = "http://prometheus.monitoring:9090"
    obj = render_autoscaler(llmd_with(scaling("keda", metrics, prometheusUrl=url)))
    assert obj is not None
    assert schema_errors(keda_crd, obj) == []
    assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = obj["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "qwen-autoscaled",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 5)
    assert spec["cooldownPeriod"] == 240
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 240}}
    assert len(spec["triggers"]) == len(metrics)
    for name, trigger in zip(metrics, spec["triggers"], strict=True):
        if name == "cpu":
            assert trigger == {
                "type": "cpu",
                "metricType": "Utilization",
                "metadata": {"value": "70"},
            }
            continue
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        # The load of all replicas of this model; KEDA divides it by the per-replica threshold.
        assert trigger["metadata"] == {
            "serverAddress": url,
            "query": f'sum({SERIES[name]}{{namespace="ml",model_name="qwen-autoscaled"}})',
            "threshold": f"{TARGETS[name]:g}",
        }
    assert len({t.get("name", t["type"]) for t in spec["triggers"]}) == len(metrics)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s.update(pollingIntervall=30), "spec.pollingIntervall: unknown field"),
        (lambda s: s["scaleTargetRef"].pop("name"), "'name' is a required property"),
        (lambda s: s.pop("triggers"), "'triggers' is a required property"),
        (lambda s: s["triggers"][0]["metadata"].update(threshold=2), "2 is not of type 'string'"),
        (
            lambda s: s.update(minReplicaCount=6),
            "spec: minReplicaCount must be less than or equal to maxReplicaCount",  # CEL
        ),
    ],
    ids=["pruned", "no-target-name", "no-triggers", "int-metadata", "min-above-max"],
)
def test_kedas_crd_refuses_what_its_api_server_would(
    change: Any, error: str, keda_crd: dict[str, Any], schema_errors: Any
) -> None:
    """The checks are not vacuous: each broken variant of a real render is refused."""
    obj = render_autoscaler(llmd_with(scaling("keda", ("requestsWaiting",))))
    assert obj is not None and schema_errors(keda_crd, obj) == []
    change(obj["spec"])
    assert any(error in e for e in schema_errors(keda_crd, obj)), schema_errors(keda_crd, obj)


def test_keda_scales_to_zero_and_defaults() -> None:
    llmd = llmd_with(
        {"engine": "keda", "minReplicas": 0, "maxReplicas": 2, "metric": "kvCacheUsage"}
    )
    obj = render_autoscaler(llmd)
    assert obj is not None and obj["spec"]["minReplicaCount"] == 0
    [trigger] = obj["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "0.8"  # kvCacheUsage's default target
    assert trigger["metadata"]["serverAddress"] == names.DEFAULT_PROMETHEUS_URL
    assert obj["spec"]["cooldownPeriod"] == 300


def test_default_metric_is_requests_waiting() -> None:
    hpa = render_autoscaler(llmd_with({"maxReplicas": 3}))
    assert hpa is not None
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "pinnace_num_requests_waiting"
    assert metric["pods"]["target"]["averageValue"] == "2"


def test_autoscaled_deployment_leaves_replicas_to_the_autoscaler() -> None:
    scaled = llmd_with(scaling("hpa", ("requestsWaiting",)))
    objects = render_all(scaled)
    assert [o["kind"] for o in objects] == [
        "PersistentVolumeClaim",
        "Service",
        "Deployment",
        "PodDisruptionBudget",  # maxReplicas > 1
        "HorizontalPodAutoscaler",
    ]
    assert "replicas" not in render_deployment(scaled)["spec"]
    fixed = parse_llmdeployment(yaml.safe_load((REPO / "examples" / "gpu.yaml").read_text()))
    assert render_deployment(fixed)["spec"]["replicas"] == 2
    assert render_autoscaler(fixed) is None
    # Turning autoscaling on or off does not roll the pods.
    hash_key = names.ANNOTATION_POD_SPEC_HASH
    pod_hash = render_deployment(scaled)["spec"]["template"]["metadata"]["annotations"][hash_key]
    body = yaml.safe_load((REPO / "examples" / "autoscaling.yaml").read_text())
    body["spec"].pop("autoscaling")
    unscaled = render_deployment(parse_llmdeployment(body))
    assert unscaled["spec"]["replicas"] == 1
    assert unscaled["spec"]["template"]["metadata"]["annotations"][hash_key] == pod_hash


def test_quantities() -> None:
    assert [quantity(v) for v in (2, 2.0, 0.8, 0.85, 12.5)] == ["2", "2", "800m", "850m", "12500m"]


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        (
            {"maxReplicas": 3, "metric": "kvCacheUsage", "target": 80},
            "the kvCacheUsage target is a fraction",
        ),
        (
            {"maxReplicas": 3, "metric": "cpu", "target": 62.5},
            "the cpu target is a whole percent",
        ),
        (
            {"engine": "keda", "minReplicas": 0, "maxReplicas": 3, "metric": "cpu"},
            "scaling to zero needs a metric other than cpu",
        ),
    ],
)
def test_targets_that_cannot_work_are_refused(autoscaling: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        llmd_with(autoscaling)


def test_the_runtime_exports_every_series_the_autoscalers_query() -> None:
    from pinnace.runtime.core.outputs import SchedulerStats
    from pinnace.runtime.server.metrics import _SchedulerCollector

    stats = SchedulerStats(3, 5, 0.5, 0, 0, 0)
    collected = {
        m.name: m.samples[0]
        for m in _SchedulerCollector(["pinnace"], "qwen", lambda: stats).collect()
    }
    for signal in SIGNALS.values():
        if signal.series is not None:
            sample = collected[signal.series]
            assert sample.labels == {"model_name": "qwen"}  # what the KEDA query selects on
    assert collected["pinnace:num_requests_waiting"].value == 5


def test_documented_adapter_rules_serve_the_metrics_the_hpa_asks_for() -> None:
    """docs/operator.md's prometheus-adapter rules turn each series into the HPA's name."""
    doc = (REPO / "docs" / "operator.md").read_text()
    section = doc[doc.index("### prometheus-adapter") :]
    block = section[section.index("```yaml") + len("```yaml") : section.index("```\n", 10)]
    served = set()
    for rule in yaml.safe_load(block)["rules"]["custom"]:
        series = re.match(r"[\w:]+", rule["seriesQuery"].strip("'"))
        assert series is not None
        pattern, template = rule["name"]["matches"], rule["name"]["as"]
        match = re.match(pattern, series.group(0))
        assert match is not None, pattern
        served.add(template.replace("${1}", match.group(1)))
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # per-pod metrics
    wanted = {s.custom_metric for s in SIGNALS.values() if s.series is not None}
    assert served == wanted
