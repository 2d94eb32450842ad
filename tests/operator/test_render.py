"""Pure renderers: schema-valid Kubernetes objects with the flags, security and probes asked for."""

from __future__ import annotations

import copy
import json
import typing
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.cli.main import build_parser
from pinnace.cli.serve import build_config
from pinnace.operator import names
from pinnace.operator.engine_spec import LM_HEAD_IN_FLOATS_NEEDS, Quantization
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import render_all, render_deployment, render_workload
from pinnace.runtime.config import EngineConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()


def example(name: str, **spec_overrides: Any) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec_overrides))
    return parse_llmdeployment(body)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [runtime] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(runtime)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"examples/{p.stem}")
def test_every_rendered_object_is_valid_kubernetes(
    path: Path,
    kserve_crds: dict[str, Any],
    keda_crd: dict[str, Any],
    lws_crd: dict[str, Any],
    schema_errors: Any,
) -> None:
    llmd = parse_llmdeployment(yaml.safe_load(path.read_text()))
    objects = render_all(llmd)
    kinds = {o["kind"] for o in objects}
    if llmd.spec.serving.is_kserve:
        assert kinds == {"ServingRuntime", "InferenceService"}
    else:
        workload = "LeaderWorkerSet" if llmd.is_multi_node else "Deployment"
        assert kinds >= {workload, "Service"} and len(kinds & {"Deployment", workload}) == 1
    # Custom resources of other projects, against their own released CRDs.
    custom = {**kserve_crds, "ScaledObject": keda_crd, "LeaderWorkerSet": lws_crd}
    for obj in objects:
        if obj["kind"] in custom:
            assert schema_errors(custom[obj["kind"]], obj) == [], obj["kind"]
        else:
            # Raises with the offending path on any unknown field or wrong type.
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_gpu_example_flags_resources_and_scheduling() -> None:
    llmd = example("gpu")
    dep = render_deployment(llmd)
    runtime = container(dep)
    args = runtime["args"]
    assert runtime["command"] == ["pinnace"] and args[0] == "serve"
    assert args[1] == "/cache/model/hf/Qwen/Qwen2.5-1.5B-Instruct@main"
    assert flag(args, "--served-model-name") == "qwen-chat"
    assert flag(args, "--max-model-len") == "8192" and flag(args, "--max-num-seqs") == "64"
    assert flag(args, "--dtype") == "bfloat16" and "--enable-prefix-caching" in args
    assert flag(args, "--gpu-memory-utilization") == "0.9"
    assert flag(args, "--port") == "8000" and flag(args, "--host") == "0.0.0.0"
    assert "--api-key" not in args  # the key travels as an env var from the Secret
    key_env = next(e for e in runtime["env"] if e["name"] == "PINNACE_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "qwen-chat-api", "key": "api-key"}
    res = runtime["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert res["limits"]["memory"] == "16Gi" and "cpu" not in res["limits"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "inference"
    assert dep["spec"]["replicas"] == 2


def test_hf_model_is_downloaded_into_the_cache_pvc_with_the_token() -> None:
    llmd = example("gpu")
    objects = {o["kind"]: o for o in render_all(llmd)}
    pvc = objects["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "qwen-chat-cache"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "qwen-chat-cache"
    [download] = pod["initContainers"]
    assert download["command"][:3] == ["hf", "download", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert flag(download["command"], "--revision") == "main"
    assert flag(download["command"], "--local-dir") == container(objects["Deployment"])["args"][1]
    token = next(e for e in download["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "hf-token"


def test_file_and_pvc_models_need_no_download() -> None:
    cpu = render_deployment(example("minimal-cpu"))
    assert "initContainers" not in cpu["spec"]["template"]["spec"]
    assert container(cpu)["args"][1] == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "--gpu-memory-utilization" not in container(cpu)["args"]
    assert flag(container(cpu)["args"], "--kv-cache-memory") == str(512 * 1024**2)

    pvc = render_deployment(example("pvc-model"))
    pod = pvc["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    model_volume = next(v for v in pod["volumes"] if v["name"] == "model-pvc")
    assert model_volume["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    args = container(pvc)["args"]
    assert args[1] == "/mnt/model-pvc/meta-llama/Llama-3.1-70B-Instruct"
    assert flag(args, "--tensor-parallel-size") == "2" and flag(args, "--quantization") == "fp8"
    assert flag(args, "--kv-cache-dtype") == "fp8"
    assert any(m["mountPath"] == "/dev/shm" for m in container(pvc)["volumeMounts"])
    assert pod["affinity"]["nodeAffinity"] and pod["runtimeClassName"] == "nvidia"


def test_runner_flag_only_when_chosen() -> None:
    args = container(render_deployment(example("embeddings")))["args"]
    assert flag(args, "--runner") == "pooling"
    # auto is the runtime's own default: not rendered, so existing pods do not roll
    assert "--runner" not in container(render_deployment(example("minimal-cpu")))["args"]


def test_lm_head_flag_only_when_kept_in_floats() -> None:
    llmd = example("gpu", engine={"quantization": "int8", "quantizeLmHead": False})
    args = container(render_deployment(llmd))["args"]
    assert "--no-quantize-lm-head" in args
    config, _ = build_config(build_parser().parse_args(["serve", str(REPO), *args[2:]]))
    assert (config.quantization, config.quantize_lm_head) == ("int8", False)
    # true is the runtime's own default: not rendered, so existing pods do not roll
    for default in (example("pvc-model"), example("gpu")):  # fp8; no quantization
        assert not any(
            "quantize-lm-head" in a for a in container(render_deployment(default))["args"]
        )


def test_lm_head_flag_in_extra_args_renders_as_before_the_field() -> None:
    """The deprecated extraArgs spelling: args as the operator rendered them before
    quantizeLmHead existed (the spec's flags, then extraArgs), so upgrading rolls no pod."""
    base = container(render_deployment(example("gpu", engine={"quantization": "int8"})))["args"]
    for extra in (["--no-quantize-lm-head"], ["--enforce-eager", "--quantize-lm-head"]):
        for field in ({}, {"quantizeLmHead": extra[-1] == "--quantize-lm-head"}):
            engine = {"quantization": "int8", "extraArgs": extra, **field}
            args = container(render_deployment(example("gpu", engine=engine)))["args"]
            assert args == base + extra, field
    args = [*base, "--no-quantize-lm-head"]
    config, _ = build_config(build_parser().parse_args(["serve", str(REPO), *args[2:]]))
    assert (config.quantization, config.quantize_lm_head) == ("int8", False)


@pytest.mark.parametrize("spelling", ["field", "extraArgs"])
@pytest.mark.parametrize("quantization", [None, *typing.get_args(Quantization)])
def test_lm_head_in_floats_is_refused_where_the_runtime_refuses_it(
    quantization: str | None, spelling: str, tmp_path: Path
) -> None:
    engine: dict[str, Any] = {"quantization": quantization} if quantization else {}
    if spelling == "field":
        engine["quantizeLmHead"] = False
    else:
        engine["extraArgs"] = ["--no-quantize-lm-head"]
    try:
        example("gpu", engine=engine)
        operator_runs = True
    except SpecError as err:
        prefix = {"field": "spec.engine: quantizeLmHead false", "extraArgs": "engine.extraArgs"}
        assert str(err).startswith(prefix[spelling]) and LM_HEAD_IN_FLOATS_NEEDS in str(err)
        operator_runs = False
    try:
        EngineConfig(model=str(tmp_path), quantization=quantization, quantize_lm_head=False)
        runtime_runs = True
    except ValueError:
        runtime_runs = False
    assert operator_runs == runtime_runs == (quantization in ("int8", "fp8"))


def test_speculative_decoding_renders_vllms_json() -> None:
    speculative = {"numSpeculativeTokens": 4, "promptLookupMax": 4}
    llmd = example("minimal-cpu", engine={"speculative": speculative})
    args = container(render_deployment(llmd))["args"]
    text = flag(args, "--speculative-config")
    assert json.loads(text) == {"method": "ngram", "num_speculative_tokens": 4,
                                "prompt_lookup_max": 4}  # fmt: skip
    # The flag the runtime parses, into the config it checks.
    config, _ = build_config(build_parser().parse_args(["serve", str(REPO), *args[2:]]))
    assert config.speculative is not None and config.speculative.num_speculative_tokens == 4
    assert config.speculative.disable_by_batch_size == 8  # unset: the runtime's default
    capped = example(
        "minimal-cpu", engine={"speculative": {**speculative, "disableByBatchSize": 2}}
    )
    args = container(render_deployment(capped))["args"]
    assert json.loads(flag(args, "--speculative-config"))["disable_by_batch_size"] == 2
    config, _ = build_config(build_parser().parse_args(["serve", str(REPO), *args[2:]]))
    assert config.speculative is not None and config.speculative.disable_by_batch_size == 2
    assert (
        "--speculative-config" not in container(render_deployment(example("minimal-cpu")))["args"]
    )


def test_draft_model_from_a_pvc_is_mounted_and_rendered_as_its_path() -> None:
    llmd = example("pvc-model", engine={
        "quantization": "fp8", "dtype": "bfloat16", "kvCacheDtype": "fp8",
        "maxModelLen": 16384, "tensorParallelSize": 2, "speculative": {
            "method": "draft_model", "model": "pvc://drafts/smol-135m",
            "numSpeculativeTokens": 3}})  # fmt: skip
    pod = render_deployment(llmd)["spec"]["template"]["spec"]
    args = container(render_deployment(llmd))["args"]
    assert json.loads(flag(args, "--speculative-config")) == {
        "method": "draft_model", "model": "/mnt/draft-pvc/smol-135m", "num_speculative_tokens": 3
    }  # fmt: skip
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if
              "persistentVolumeClaim" in v}  # fmt: skip
    assert claims["draft-pvc"] == {"claimName": "drafts", "readOnly": True}
    assert "model-pvc" in claims  # the model's own claim is still there
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["draft-pvc"]["mountPath"] == "/mnt/draft-pvc" and mounts["draft-pvc"]["readOnly"]
    assert not any("draft" in c["name"] for c in pod.get("initContainers", []))
    # The runtime parses the flag into a draft_model config (the path is read at load).
    config, _ = build_config(build_parser().parse_args(["serve", str(REPO), *args[2:]]))
    assert config.speculative is not None and config.speculative.method == "draft_model"
    assert config.speculative.model == "/mnt/draft-pvc/smol-135m"


def test_draft_model_from_hf_is_downloaded_by_an_init_container() -> None:
    llmd = example("minimal-cpu", engine={"speculative": {
        "method": "draft_model", "model": "hf://HuggingFaceTB/SmolLM2-135M",
        "numSpeculativeTokens": 4}})  # fmt: skip
    pod = render_deployment(llmd)["spec"]["template"]["spec"]
    draft_dir = "/cache/draft/hf/HuggingFaceTB/SmolLM2-135M"
    spec_config = json.loads(flag(pod["containers"][0]["args"], "--speculative-config"))
    assert spec_config["model"] == draft_dir
    inits = {c["name"]: c for c in pod["initContainers"]}
    assert set(inits) == {"download-draft"}  # the model is a file:// in the image
    command = inits["download-draft"]["command"]
    assert command[:3] == ["hf", "download", "HuggingFaceTB/SmolLM2-135M"]
    assert flag(command, "--local-dir") == draft_dir
    # Ngram (no draft) renders no second init container.
    plain = example("minimal-cpu", engine={"speculative": {"numSpeculativeTokens": 4}})
    assert "initContainers" not in render_deployment(plain)["spec"]["template"]["spec"]


def test_kserve_takes_a_draft_baked_into_the_image() -> None:
    llmd = example(
        "kserve",
        engine={
            "speculative": {
                "method": "draft_model",
                "model": "file:///drafts/smol",
                "numSpeculativeTokens": 2,
            }
        },
    )
    [runtime] = [o for o in render_all(llmd) if o["kind"] == "ServingRuntime"]
    args = runtime["spec"]["containers"][0]["args"]
    assert json.loads(flag(args, "--speculative-config"))["model"] == "/drafts/smol"


def pod_specs(llmd: LLMDeployment) -> list[dict[str, Any]]:
    """The Deployment's pod, or a LeaderWorkerSet's leader and worker pods."""
    workload = render_workload(llmd)
    if workload["kind"] == "Deployment":
        return [workload["spec"]["template"]["spec"]]
    group = workload["spec"]["leaderWorkerTemplate"]
    return [group["leaderTemplate"]["spec"], group["workerTemplate"]["spec"]]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"examples/{p.stem}")
def test_pods_are_locked_down(path: Path) -> None:
    for pod in pod_specs(parse_llmdeployment(yaml.safe_load(path.read_text()))):
        _check_locked_down(pod)


def _check_locked_down(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        # A read-only root needs writable scratch: the cache and /tmp are volumes.
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/cache", "/tmp"} <= mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"] == "/cache/hf" and env["HOME"] == "/tmp"


def test_probes_and_draining() -> None:
    small, big = render_deployment(example("minimal-cpu")), render_deployment(example("pvc-model"))
    for dep in (small, big):
        runtime = container(dep)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert runtime[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert runtime["ports"] == [
            {"name": "http", "containerPort": 8000, "protocol": "TCP"},
            {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
        ]
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = runtime["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert grace >= 60 and pre_stop > 0
        # The runtime's drain (read by the real CLI parser) fits in the grace period after
        # the preStop sleep, with margin to close connections before SIGKILL.
        drain = build_parser().parse_args(runtime["args"]).shutdown_timeout
        assert drain >= 30 and pre_stop + drain + 10 <= grace

    def budget(dep: dict[str, Any]) -> int:
        probe = container(dep)["startupProbe"]
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    # A 70B model gets a longer load budget than a 135M one, both at least 5 minutes.
    assert budget(big) > budget(small) >= 300


def test_labels_selector_and_service() -> None:
    llmd = example("gpu")
    objects = {o["kind"]: o for o in render_all(llmd)}
    dep, svc = objects["Deployment"], objects["Service"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "pinnace",
        "app.kubernetes.io/instance": "qwen-chat",
    }
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": 8081,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c",
        },
    ]
    for obj in objects.values():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "pinnace-operator"
        assert labels["app.kubernetes.io/instance"] == "qwen-chat"
        assert obj["metadata"]["namespace"] == "ml"
        assert "ownerReferences" not in obj["metadata"]  # owner-neutral; the operator adopts


def pod_hash(llmd: LLMDeployment) -> str:
    dep = render_deployment(llmd)
    return str(dep["spec"]["template"]["metadata"]["annotations"][names.ANNOTATION_POD_SPEC_HASH])


def test_pod_spec_hash_changes_exactly_when_pods_must_roll() -> None:
    base = pod_hash(example("gpu"))
    assert pod_hash(example("gpu")) == base  # deterministic
    assert pod_hash(example("gpu", replicas=5)) == base  # scaling does not roll pods
    engine = {**yaml.safe_load((REPO / "examples" / "gpu.yaml").read_text())["spec"]["engine"]}
    assert pod_hash(example("gpu", engine={**engine, "dtype": "float16"})) != base
    assert pod_hash(example("gpu", image="ghcr.io/pinnace/runtime:0.2.0")) != base


def test_rendering_is_pure_and_repeatable() -> None:
    llmd = example("adapters")
    assert render_all(llmd) == render_all(llmd)
    first = render_all(llmd)
    first[-1]["spec"]["replicas"] = 99  # mutating output must not leak into the next render
    assert render_all(llmd)[-1]["spec"]["replicas"] == 1
