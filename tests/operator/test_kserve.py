"""KServe mode: renders valid for KServe's own CRDs; status mirrors the InferenceService."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import render_all

REPO = Path(__file__).resolve().parents[2]
ISVC = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/qwen-kserve"
RUNTIME = "/apis/serving.kserve.io/v1alpha1/namespaces/ml/servingruntimes/qwen-kserve"


def body(name: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    doc["spec"].update(copy.deepcopy(spec))
    return dict(doc)


def rendered(llmd: LLMDeployment) -> tuple[dict[str, Any], dict[str, Any]]:
    runtime, isvc = render_all(llmd)
    assert (runtime["kind"], isvc["kind"]) == ("ServingRuntime", "InferenceService")
    return runtime, isvc


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# Every way KServe mode renders differently: modes, autoscalers, storage layouts.
KSERVE_CASES = {
    "kserve": body("kserve"),
    "kserve-serverless": body("kserve-serverless"),
    "fixed-replicas": body("kserve", autoscaling=None, replicas=3),
    "hpa-on-cpu": body(
        "kserve", autoscaling={"maxReplicas": 3, "metric": "cpu"}, resources={"cpu": "4"}
    ),
    "keda-all-metrics": body(
        "kserve",
        autoscaling={
            "engine": "keda",
            "maxReplicas": 3,
            "metrics": [{"metric": m} for m in ("requestsWaiting", "kvCacheUsage", "cpu")],
        },
        resources={"cpu": "4", "gpu": {"count": 2}},
        engine={"tensorParallelSize": 2},
    ),
    "adapters": body(
        "adapters",
        model={"uri": "s3://models/llama-3.2-3b-instruct"},
        storage={},
        serving={"mode": "KServe"},
    ),
    "pvc-model": body("pvc-model", serving={"mode": "KServe"}),
}


@pytest.mark.parametrize("case", sorted(KSERVE_CASES))
def test_renders_are_valid_for_kserves_crds(
    case: str, kserve_crds: dict[str, Any], schema_errors: Any
) -> None:
    for obj in render_all(parse_llmdeployment(KSERVE_CASES[case])):
        assert schema_errors(kserve_crds[obj["kind"]], obj) == [], obj["kind"]


def test_inference_service_carries_storage_resources_scheduling_and_keda() -> None:
    runtime, isvc = rendered(parse_llmdeployment(body("kserve")))
    annotations = isvc["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_KSERVE_DEPLOYMENT_MODE] == "RawDeployment"
    assert annotations[names.ANNOTATION_KSERVE_AUTOSCALER_CLASS] == "keda"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "pinnace"}
    assert model["runtime"] == runtime["metadata"]["name"] == "qwen-kserve"
    # KServe's spelling of an hf:// revision; its storage initializer fetches to /mnt/models.
    assert model["storageUri"] == "hf://Qwen/Qwen2.5-1.5B-Instruct:main"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert model["resources"]["limits"]["memory"] == "16Gi"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    [metric] = predictor["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {
        "backend": "prometheus",
        "serverAddress": names.DEFAULT_PROMETHEUS_URL,
        "query": 'sum(pinnace:num_requests_waiting{namespace="ml",model_name="qwen"})',
    }
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    scale_down = predictor["autoScaling"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == 300
    assert predictor["serviceAccountName"] == "hf-reader"
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["automountServiceAccountToken"] is False


def test_serving_runtime_runs_pinnace_serve_with_both_protocols() -> None:
    runtime, _ = rendered(parse_llmdeployment(body("kserve")))
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"pinnace", "huggingface"}
    # This runtime carries one model's flags: no other InferenceService may pick it.
    assert not any(f["autoSelect"] for f in formats.values())
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["pinnace"] and container["args"][:2] == ["serve", "/mnt/models"]
    args = container["args"]
    assert flag(args, "--served-model-name") == "qwen" and flag(args, "--port") == "8000"
    assert container["ports"] == [
        {"name": "http1", "containerPort": 8000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert flag(args, "--grpc-port") == "8081"
    assert "resources" not in container  # set on the InferenceService, merged by KServe
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/cache"}
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"


def test_serverless_scales_to_zero_on_concurrency() -> None:
    runtime, isvc = rendered(parse_llmdeployment(body("kserve-serverless")))
    annotations = isvc["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_KSERVE_DEPLOYMENT_MODE] == "Serverless"
    assert annotations["autoscaling.knative.dev/scale-down-delay"] == "120s"
    assert names.ANNOTATION_KSERVE_AUTOSCALER_CLASS not in annotations
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 3)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 6)
    assert "storageUri" not in predictor["model"]  # file:// is baked into the image
    # Knative rejects these on a user container/pod without feature flags.
    [container] = runtime["spec"]["containers"]
    assert "startupProbe" not in container and "lifecycle" not in container
    assert "securityContext" not in predictor
    assert container["args"][1] == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_fixed_replicas_and_cpu_hpa() -> None:
    _, fixed = rendered(parse_llmdeployment(KSERVE_CASES["fixed-replicas"]))
    predictor = fixed["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 3)
    assert names.ANNOTATION_KSERVE_AUTOSCALER_CLASS not in fixed["metadata"]["annotations"]
    _, hpa = rendered(parse_llmdeployment(KSERVE_CASES["hpa-on-cpu"]))
    predictor = hpa["spec"]["predictor"]
    assert hpa["metadata"]["annotations"][names.ANNOTATION_KSERVE_AUTOSCALER_CLASS] == "hpa"
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 80)
    assert "autoScaling" not in predictor


def test_adapters_are_fetched_by_kserve_under_one_root() -> None:
    runtime, isvc = rendered(parse_llmdeployment(KSERVE_CASES["adapters"]))
    predictor = isvc["spec"]["predictor"]
    assert "storageUri" not in predictor["model"]  # storageUri and storageUris exclude each other
    assert predictor["storageUris"] == [
        {"uri": "s3://models/llama-3.2-3b-instruct", "mountPath": "/mnt/models/model"},
        {"uri": "s3://models/adapters/billing", "mountPath": "/mnt/models/adapters/billing"},
        {"uri": "hf://acme/returns-lora", "mountPath": "/mnt/models/adapters/returns"},
        {"uri": "pvc://adapters/tone", "mountPath": "/mnt/models/adapters/tone"},
    ]
    args = runtime["spec"]["containers"][0]["args"]
    assert args[1] == "/mnt/models/model"
    modules = args[args.index("--lora-modules") + 1 : args.index("--max-num-batched-tokens")]
    assert modules == [f"{n}=/mnt/models/adapters/{n}" for n in ("billing", "returns", "tone")]


def test_kserve_mode_refuses_what_kserve_cannot_express() -> None:
    with pytest.raises(SpecError, match=r"storage\.cache does not apply in KServe mode"):
        parse_llmdeployment(body("gpu", serving={"mode": "KServe"}, model={"uri": "hf://a/b"}))
    with pytest.raises(SpecError, match="replicas 0 is not supported in KServe mode"):
        parse_llmdeployment(body("kserve", autoscaling=None, replicas=0))
    with pytest.raises(SpecError, match="engine keda needs KServe deploymentMode RawDeployment"):
        parse_llmdeployment(body("kserve-serverless", autoscaling={
            "engine": "keda", "minReplicas": 1, "maxReplicas": 2, "metric": "requestsRunning"
        }))  # fmt: skip


# -- the operator against the emulated API server, with KServe's CRDs registered --


def condition(cr: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in cr["status"]["conditions"] if c["type"] == type_)


def test_operator_creates_the_inference_service_and_mirrors_its_status(
    cluster: Any, create_llmd: Any, start_operator: Any, kserve_crds: dict[str, Any]
) -> None:
    for crd in kserve_crds.values():
        cluster.apply_crd(crd)  # the emulator now validates them against KServe's schemas
    operator = start_operator()
    path = create_llmd("kserve")
    cr = cluster.get(path)
    isvc = cluster.wait_for(lambda: cluster.get(ISVC))
    runtime = cluster.wait_for(lambda: cluster.get(RUNTIME))
    for child in (isvc, runtime):
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("LLMDeployment", cr["metadata"]["uid"])
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "qwen-kserve"
    assert cluster.get("/apis/apps/v1/namespaces/ml/deployments/qwen-kserve") is None

    # No status from KServe yet: Ready is Unknown, and says what it waits for.
    cr = cluster.wait_for(lambda: (c := cluster.get(path)) and "status" in c and c)
    assert condition(cr, "Ready")["status"] == "Unknown"
    assert (
        condition(cr, "Ready")["reason"] == "AwaitingKServe" and cr["status"]["phase"] == "Pending"
    )
    assert cr["status"]["selector"] == "serving.kserve.io/inferenceservice=qwen-kserve"

    # KServe reports a failure: its reason and message become ours.
    failing = {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "RevisionMissing",
                "message": "predictor is not ready",
            }
        ],
    }
    assert cluster.patch(ISVC + "/status", {"status": failing}).status_code == 200
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and condition(c, "Ready")["status"] == "False" and c
    )
    assert condition(cr, "Ready")["reason"] == "RevisionMissing"
    assert condition(cr, "Ready")["message"] == "predictor is not ready"
    assert cr["status"]["phase"] == "Progressing"

    # KServe reports Ready with its URLs: the resource is Ready at the same address.
    ready = {
        "observedGeneration": 1,
        "url": "http://qwen-kserve-ml.example.com",
        "address": {"url": "http://qwen-kserve-predictor.ml.svc.cluster.local"},
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    assert cluster.patch(ISVC + "/status", {"status": ready}).status_code == 200
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c["status"].get("phase") == "Ready" and c
    )
    assert condition(cr, "Ready")["status"] == "True"
    assert cr["status"]["url"] == "http://qwen-kserve-ml.example.com"
    assert cr["status"]["endpoint"] == "http://qwen-kserve-predictor.ml.svc.cluster.local/v1"
    assert "http://qwen-kserve-ml.example.com" in condition(cr, "Ready")["message"]
    assert cr["spec"] == body("kserve")["spec"]  # never written by the operator
    assert operator.alive


def test_the_schema_check_catches_what_the_api_server_would_drop(
    kserve_crds: dict[str, Any], schema_errors: Any
) -> None:
    _, isvc = rendered(parse_llmdeployment(body("kserve")))
    isvc["spec"]["predictor"]["minReplica"] = 1  # a typo KServe would silently prune
    isvc["spec"]["predictor"]["maxReplicas"] = "4"  # a wrong type it would reject
    assert sorted(schema_errors(kserve_crds["InferenceService"], isvc)) == [
        "spec.predictor.maxReplicas: '4' is not of type 'integer'",
        "spec.predictor.minReplica: unknown field",
    ]
