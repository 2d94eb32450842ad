"""Pure status computation and the GPU fit estimate."""

from __future__ import annotations

from typing import Any

import pytest

from pinnace.operator.fit import GIB, ModelShape, estimate, parse_param_count, shape_from_hf_config
from pinnace.operator.llmdeployment import parse_llmdeployment
from pinnace.operator.status import (
    Effective,
    Observation,
    degraded_status,
    healthy_status,
    observe_deployment,
    transition_events,
)

EFFECTIVE = Effective(image="img", model_path="/m", served_model_name="m", args=["serve", "/m"])


def status(
    obs: Observation, previous: dict[str, Any] | None = None, now: str = "t1"
) -> dict[str, Any]:
    return healthy_status(
        desired_replicas=2,
        obs=obs,
        previous=previous,
        generation=3,
        now=now,
        endpoint="http://m.ml.svc.cluster.local:8000/v1",
        selector="a=b",
        effective=EFFECTIVE,
    )


def conditions(s: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in s["conditions"]}


def test_status_follows_the_rollout() -> None:
    pending = status(Observation(exists=True, replicas=2, ready=0, updated=2, up_to_date=True))
    assert pending["phase"] == "Pending" and pending["observedGeneration"] == 3
    assert conditions(pending) == {
        "Ready": ("False", "ReplicasNotReady"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
    }
    ready = status(
        Observation(exists=True, replicas=2, ready=2, updated=2, up_to_date=True), pending, "t2"
    )
    assert ready["phase"] == "Ready" and ready["endpoint"].endswith(":8000/v1")
    assert conditions(ready)["Ready"] == ("True", "ReplicasReady")
    assert conditions(ready)["Progressing"] == ("False", "RolloutComplete")
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    # Degraded did not flip, so its transition time is kept; Ready flipped at t2.
    assert times == {"Ready": "t2", "Progressing": "t2", "Degraded": "t1"}
    assert [e.reason for e in transition_events(pending, ready)] == ["Ready"]
    # Same facts, later time: identical status, so reconcile writes nothing.
    same = status(
        Observation(exists=True, replicas=2, ready=2, updated=2, up_to_date=True), ready, "t9"
    )
    assert same == ready and transition_events(ready, same) == []


def test_stuck_rollout_and_invalid_spec_are_degraded() -> None:
    dep = {
        "metadata": {"generation": 2},
        "status": {
            "observedGeneration": 2,
            "replicas": 1,
            "conditions": [
                {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
            ],
        },
    }
    stuck = status(observe_deployment(dep))
    assert stuck["phase"] == "Degraded" and conditions(stuck)["Degraded"] == (
        "True",
        "RolloutStuck",
    )
    ready = status(Observation(exists=True, replicas=2, ready=2, updated=2, up_to_date=True))
    bad = degraded_status(
        reason="InvalidSpec", message="spec.x: nope", previous=ready, generation=4, now="t3"
    )
    assert bad["phase"] == "Degraded" and bad["observedGeneration"] == 4
    assert conditions(bad)["Degraded"] == ("True", "InvalidSpec")
    assert conditions(bad)["Ready"] == ("True", "ReplicasReady")  # old pods keep serving
    assert bad["readyReplicas"] == 2 and bad["endpoint"] == ready["endpoint"]
    assert [(e.type, e.reason, e.message) for e in transition_events(ready, bad)] == [
        ("Warning", "InvalidSpec", "spec.x: nope")
    ]


def test_observe_a_deployment_the_controller_has_not_seen_yet() -> None:
    obs = observe_deployment({"metadata": {"generation": 5}, "status": {"observedGeneration": 4}})
    assert obs.exists and not obs.up_to_date and obs.ready == 0
    assert observe_deployment(None) == Observation()


@pytest.mark.parametrize(
    ("text", "count"), [("135M", 135_000_000), ("1.5B", 1_500_000_000), ("7000", 7000)]
)
def test_parse_param_count(text: str, count: int) -> None:
    assert parse_param_count(text) == count


# Qwen2.5-1.5B-Instruct's config.json (the fields the estimate reads).
QWEN_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}


def test_shape_from_config_matches_the_published_size() -> None:
    shape = shape_from_hf_config(QWEN_1_5B)
    assert shape.num_params == pytest.approx(1.54e9, rel=0.02)  # "1.54B" on the model card
    # K and V, 28 layers x 2 KV heads x 128 dims, bf16.
    assert shape.kv_bytes_per_token(2.0) == 2 * 28 * 2 * 128 * 2


def llmd(gpu: dict[str, Any], engine: dict[str, Any]) -> Any:
    spec = {
        "model": {"uri": "hf://Qwen/Qwen2.5-1.5B-Instruct"},
        "resources": {"gpu": gpu},
        "engine": engine,
    }
    return parse_llmdeployment({"metadata": {"name": "m"}, "spec": spec})


def test_fit_estimate_counts_weights_kv_and_tensor_parallelism() -> None:
    shape = shape_from_hf_config(QWEN_1_5B)
    fits = estimate(llmd({"count": 1, "memory": "24Gi"}, {"maxModelLen": 32768}), shape)
    assert fits is not None and fits.fits
    assert fits.weights_bytes == pytest.approx(shape.num_params * 2)
    assert fits.kv_bytes == 2 * 28 * 2 * 128 * 2 * 32768
    # int8 halves the weights; a head kept in bf16 (tied: one copy) adds back its bytes.
    int8 = estimate(llmd({"count": 1, "memory": "24Gi"}, {"quantization": "int8"}), shape)
    head = estimate(
        llmd({"count": 1, "memory": "24Gi"}, {"quantization": "int8", "quantizeLmHead": False}),
        shape,
    )
    assert int8 is not None and head is not None
    assert int8.weights_bytes == pytest.approx(shape.num_params)
    assert head.weights_bytes - int8.weights_bytes == pytest.approx(151936 * 1536)
    flag = {"quantization": "int8", "extraArgs": ["--no-quantize-lm-head"]}  # deprecated
    assert estimate(llmd({"count": 1, "memory": "24Gi"}, flag), shape) == head
    tiny = estimate(llmd({"count": 1, "memory": "2Gi"}, {}), shape)
    assert tiny is not None and not tiny.fits and "needs ~" in tiny.describe()
    big = ModelShape(num_params=70_000_000_000)
    one = estimate(llmd({"count": 1, "memory": "80Gi"}, {}), big)
    two = estimate(
        llmd({"count": 2, "memory": "80Gi"}, {"tensorParallelSize": 2, "quantization": "fp8"}), big
    )
    assert one is not None and two is not None and not one.fits and two.fits
    assert two.weights_bytes == pytest.approx(35e9) and two.budget_bytes == pytest.approx(72 * GIB)
    # Nothing to compare against: CPU-only, or GPU memory not declared.
    assert estimate(llmd({"count": 1}, {}), big) is None
