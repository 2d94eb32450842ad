"""Adapters in the rendered objects (Deployment mode): never in the pod template, so the
list can change without a rollout; fetch Jobs for what pods cannot read directly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import render_all, render_deployment, render_service
from pinnace.operator.render.adapters import adapter_sources, fetch_state, render_fetch_jobs

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()


def example(name: str, **spec: Any) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec))
    return parse_llmdeployment(body)


def template(llmd: LLMDeployment) -> dict[str, Any]:
    return dict(render_deployment(llmd)["spec"]["template"])


def args(llmd: LLMDeployment) -> list[str]:
    return list(template(llmd)["spec"]["containers"][0]["args"])


ADAPTER_LISTS = [
    [{"name": "billing", "uri": "s3://models/adapters/billing"}],
    [{"name": "tone", "uri": "pvc://adapters/tone"}, {"name": "x", "uri": "file:///a/x"}],
    [{"name": "returns", "uri": "hf://acme/returns-v2"}, {"name": "y", "uri": "gs://b/y"}],
    [{"name": "cached", "uri": "pvc://shared-model-cache/adapters/c"}],
]


def test_the_adapter_list_never_changes_the_deployment() -> None:
    deployment = render_deployment(example("adapters"))
    for adapters in ADAPTER_LISTS:
        assert render_deployment(example("adapters", adapters=adapters)) == deployment
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["download-model"]
    assert {v["name"] for v in pod["volumes"]} == {"cache", "tmp"}
    runtime_args = pod["containers"][0]["args"]
    assert "--enable-lora" in runtime_args and "--lora-modules" not in runtime_args
    assert runtime_args[-2:] == ["--max-num-batched-tokens", "4096"]  # extraArgs go last


def test_lora_on_or_off_is_the_one_adapter_choice_that_rolls_pods() -> None:
    with_adapters = template(example("adapters"))
    assert template(example("adapters", adapters=[])) != with_adapters  # LoRA slots freed
    # engine.enableLora keeps the slots: removing the last adapter hot-unloads it.
    engine = {**yaml.safe_load((REPO / "examples/adapters.yaml").read_text())["spec"]["engine"]}
    reserved = example("adapters", adapters=[], engine={**engine, "enableLora": True})
    assert template(reserved) == with_adapters
    assert "--enable-lora" not in args(example("gpu"))


def test_each_adapter_is_loaded_from_a_path_every_pod_has() -> None:
    llmd = example(
        "adapters",
        model={"uri": "pvc://model-store/llama"},
        adapters=[
            {"name": "baked", "uri": "file:///opt/adapters/baked"},
            {"name": "cached", "uri": "pvc://shared-model-cache/adapters/c"},
            {"name": "beside", "uri": "pvc://model-store/adapters/b"},
            {"name": "elsewhere", "uri": "pvc://adapters/tone"},
            {"name": "hub", "uri": "hf://acme/returns-lora"},
        ],
    )
    sources = {s.name: s for s in adapter_sources(llmd)}
    assert {n: s.path for n, s in sources.items()} == {
        "baked": "/opt/adapters/baked",
        "cached": "/cache/adapters/c",
        "beside": "/mnt/model-pvc/adapters/b",
        "elsewhere": "/cache/adapters/pvc/adapters/tone",
        "hub": "/cache/adapters/hf/acme/returns-lora",
    }
    assert {n for n, s in sources.items() if s.fetch_job} == {"elsewhere", "hub"}
    jobs = {j["metadata"]["name"]: j for j in render_fetch_jobs(llmd)}
    assert set(jobs) == {sources["elsewhere"].fetch_job, sources["hub"].fetch_job}


def test_fetch_jobs_are_valid_locked_down_and_invisible_to_the_service() -> None:
    llmd = example("adapters")
    jobs = render_fetch_jobs(llmd)
    assert [j["metadata"]["annotations"]["pinnace.dev/adapter-uri"] for j in jobs] == [
        "s3://models/adapters/billing",
        "hf://acme/returns-lora",
        "pvc://adapters/tone",
    ]
    service_selector = render_service(llmd)["spec"]["selector"].items()
    for job in jobs:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        # The Job controller copies the name into a label value: at most 63 characters.
        assert len(job["metadata"]["name"]) <= 63
        pod = job["spec"]["template"]
        assert not service_selector <= pod["metadata"]["labels"].items()
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        [fetch] = spec["containers"]
        assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
        cache = next(v for v in spec["volumes"] if v["name"] == "cache")
        assert cache["persistentVolumeClaim"] == {"claimName": "shared-model-cache"}
        term = spec["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == dict(service_selector)
    s3, hf, pvc = (j["spec"]["template"]["spec"] for j in jobs)
    # The model's s3 credentials go to the s3 fetch only.
    assert s3["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert "envFrom" not in hf["containers"][0]
    hf_dest = "/cache/adapters/hf/acme/returns-lora"
    assert hf["containers"][0]["command"][-2:] == ["--local-dir", hf_dest]
    source = next(v for v in pvc["volumes"] if v["name"] == "source")
    assert source["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    assert pvc["containers"][0]["command"][-2:] == [
        "/mnt/source/tone",
        "/cache/adapters/pvc/adapters/tone",
    ]


def test_a_changed_fetch_is_a_new_job_and_two_names_for_one_uri_share_one() -> None:
    [job] = render_fetch_jobs(example("adapters", adapters=ADAPTER_LISTS[0]))
    [bumped] = render_fetch_jobs(
        example("adapters", adapters=ADAPTER_LISTS[0], image="ghcr.io/pinnace/runtime:0.2.0")
    )
    assert bumped["metadata"]["name"] == job["metadata"]["name"]  # same aws-cli fetch
    [hf] = render_fetch_jobs(example("adapters", adapters=[{"name": "h", "uri": "hf://a/b"}]))
    [hf2] = render_fetch_jobs(
        example("adapters", adapters=[{"name": "h", "uri": "hf://a/b"}], image="my/runtime:2")
    )
    assert hf2["metadata"]["name"] != hf["metadata"]["name"]  # Job templates are immutable
    twice = [{"name": "a", "uri": "hf://a/b"}, {"name": "b", "uri": "hf://a/b"}]
    assert len(render_fetch_jobs(example("adapters", adapters=twice))) == 1


def test_kserve_mode_keeps_adapters_with_kserve_and_renders_no_jobs() -> None:
    model = {"uri": "s3://models/llama-3.2-3b-instruct", "parameterCount": "3B"}
    llmd = example("adapters", model=model, serving={"mode": "KServe"}, storage={})
    assert render_fetch_jobs(llmd) == []
    assert {o["kind"] for o in render_all(llmd)} == {"ServingRuntime", "InferenceService"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"storage": {}},
            "adapters: billing (s3://models/adapters/billing) is fetched once into "
            "storage.cache, where running pods can load it without a restart",
        ),
        (
            {"storage": {"cache": {"size": "50Gi", "accessMode": "ReadWriteOncePod"}}},
            "storage.cache.accessMode ReadWriteOncePod leaves no access for the Job that "
            "fetches adapter billing",
        ),
        ({"engine": {"extraArgs": ["--lora-modules", "a=/b"]}}, "engine.extraArgs: --lora-modules"),
    ],
)
def test_what_cannot_be_hot_loaded_is_refused_with_a_way_out(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as caught:
        example("adapters", **spec)
    assert str(caught.value).startswith(message)


def test_local_adapters_need_no_cache() -> None:
    llmd = example("adapters", storage={}, adapters=[{"name": "x", "uri": "file:///a/x"}])
    assert render_fetch_jobs(llmd) == [] and llmd.lora_enabled


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, (False, None)),
        ({"active": 1}, (False, None)),
        ({"succeeded": 1}, (True, None)),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, (True, None)),
        (
            {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]},
            (False, "fetch Job j failed: DeadlineExceeded"),
        ),
        ({"conditions": [{"type": "Failed", "status": "False"}]}, (False, None)),
    ],
)
def test_fetch_state_reads_the_job_status(
    status: dict[str, Any], expected: tuple[bool, str | None]
) -> None:
    assert fetch_state({"metadata": {"name": "j"}, "status": status}) == expected
    assert fetch_state(None) == (False, None)


def test_pod_spec_hash_annotation_is_still_rendered() -> None:
    annotations = template(example("adapters"))["metadata"]["annotations"]
    assert names.ANNOTATION_POD_SPEC_HASH in annotations
