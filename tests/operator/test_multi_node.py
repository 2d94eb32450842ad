"""Multi-node models: a replica whose GPUs (tensor x pipeline parallel) exceed one pod's runs
as a LeaderWorkerSet group. Rendered objects are checked against LeaderWorkerSet's own
released CRD (data/lws/), the core ones and the pod templates with kubernetes-validate
(strict); the operator runs against the API emulator with that CRD installed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pinnace.operator import names, runtime_support
from pinnace.operator.fit import check_fit
from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.render import (
    render_all,
    render_autoscaler,
    render_network_policy,
    render_workload,
)
from pinnace.operator.render.labels import selector_string

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()
BASE = "/apis/pinnace.dev/v1alpha1/namespaces/ml/llmdeployments"
LWS = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ml/leaderworkersets/llama-405b"
DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/llama-405b"
SERVICE = "/api/v1/namespaces/ml/services/llama-405b"
LEADER = {names.LWS_WORKER_INDEX_LABEL: "0"}


def example(name: str = "multi-node", **spec: Any) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec))
    return parse_llmdeployment(body)


def group_of(lws: dict[str, Any]) -> dict[str, Any]:
    return dict(lws["spec"]["leaderWorkerTemplate"])


def container(template: dict[str, Any]) -> dict[str, Any]:
    [runtime] = template["spec"]["containers"]
    return dict(runtime)


def as_pod(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], **template}


def test_tp8_pp2_on_8_gpu_pods_is_a_valid_leader_worker_set_of_2(
    lws_crd: dict[str, Any], schema_errors: Any
) -> None:
    llmd = example()
    check_fit(llmd)  # 405B in bf16 fits 16 x 80Gi, not 8 (below)
    objects = {o["kind"]: o for o in render_all(llmd)}
    assert set(objects) == {"Service", "LeaderWorkerSet"}  # no Deployment
    lws = objects["LeaderWorkerSet"]
    assert schema_errors(lws_crd, lws) == []  # schema, nothing pruned, CEL rules
    group = group_of(lws)
    assert (lws["apiVersion"], lws["spec"]["replicas"], group["size"]) == (
        "leaderworkerset.x-k8s.io/v1",
        1,
        2,
    )
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    # The leader is Ready only once the model is loaded on every rank: LeaderReady would
    # never create the workers.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "maxSurge": 0,
        "maxUnavailable": 1,
    }
    kubernetes_validate.validate(objects["Service"], K8S_VERSION, strict=True)
    leader, worker = group["leaderTemplate"], group["workerTemplate"]
    for template in (leader, worker):
        kubernetes_validate.validate(as_pod(template), K8S_VERSION, strict=True)
        runtime = container(template)
        assert runtime["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in runtime["volumeMounts"]
        args = runtime["args"]
        assert args[args.index("--tensor-parallel-size") + 1] == "8"
        assert args[args.index("--pipeline-parallel-size") + 1] == "2"
        # Rank, group size and leader address come from LeaderWorkerSet's pod environment.
        assert not {"--nnodes", "--node-rank", "--master-addr"} & set(args)
    assert container(leader)["args"] == container(worker)["args"]
    # The leader serves the API (probes, ports, drain pause); workers run ranks only.
    assert {"readinessProbe", "startupProbe", "livenessProbe", "ports"} <= set(container(leader))
    assert not {"readinessProbe", "startupProbe", "livenessProbe", "ports"} & set(container(worker))


def test_the_service_and_the_scale_selector_pick_leaders_only() -> None:
    multi, single = example(), example("pvc-model")
    service = {o["kind"]: o for o in render_all(multi)}["Service"]
    assert service["spec"]["selector"] == {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_INSTANCE: "llama-405b",
        **LEADER,
    }
    assert f"{names.LWS_WORKER_INDEX_LABEL}=0" in selector_string(multi)
    single_service = {o["kind"]: o for o in render_all(single)}["Service"]
    assert names.LWS_WORKER_INDEX_LABEL not in single_service["spec"]["selector"]
    assert names.LWS_WORKER_INDEX_LABEL not in selector_string(single)


@pytest.mark.parametrize(
    ("gpus", "tp", "pp", "kind", "size"),
    [
        (2, 2, 1, "Deployment", None),  # fits one pod: as before
        (8, 4, 2, "Deployment", None),
        (1, 2, 1, "LeaderWorkerSet", 2),  # one GPU per pod, two pods
        (4, 4, 4, "LeaderWorkerSet", 4),
    ],
)
def test_a_replica_is_a_group_only_when_its_gpus_exceed_one_pod(
    gpus: int, tp: int, pp: int, kind: str, size: int | None
) -> None:
    llmd = example(
        resources={"gpu": {"count": gpus}},
        engine={"tensorParallelSize": tp, "pipelineParallelSize": pp},
    )
    workload = render_workload(llmd)
    assert workload["kind"] == kind
    if size is not None:
        assert group_of(workload)["size"] == size == llmd.group_size


def test_the_fit_check_counts_the_whole_group() -> None:
    with pytest.raises(SpecError, match="model will not fit"):  # 810 GB over 8 GPUs
        check_fit(example(engine={"tensorParallelSize": 8, "dtype": "bfloat16"}))
    check_fit(example())  # over 16: ~47 GiB each of the 72 GiB budget


def test_autoscalers_scale_groups_and_the_network_policy_lets_a_group_talk(
    keda_crd: dict[str, Any], schema_errors: Any
) -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 3, "metric": "requestsWaiting"}
    hpa = render_autoscaler(example(replicas=None, autoscaling=scaling))
    keda = render_autoscaler(example(replicas=None, autoscaling={**scaling, "engine": "keda"}))
    assert hpa is not None and keda is not None
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert schema_errors(keda_crd, keda) == []
    target = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet"}
    for scaler in (hpa, keda):
        assert scaler["spec"]["scaleTargetRef"] == {**target, "name": "llama-405b"}
    assert "replicas" not in render_workload(example(replicas=None, autoscaling=scaling))["spec"]

    policy = render_network_policy(example(networkPolicy={}))
    assert policy is not None
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    same_model = {"podSelector": {"matchLabels": {names.LABEL_NAME: names.APP_NAME,
                                                  names.LABEL_INSTANCE: "llama-405b"}}}  # fmt: skip
    assert {"from": [same_model]} in policy["spec"]["ingress"]  # every port
    single = render_network_policy(example("pvc-model", networkPolicy={}))
    assert single is not None and {"from": [same_model]} not in single["spec"]["ingress"]


def test_operator_refuses_a_group_the_runtime_cannot_run(
    cluster: Any,
    create_llmd: Any,
    start_operator: Any,
    lws_crd: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime without multi-node groups (RUNS_MULTI_NODE off, as before they ran): no
    LeaderWorkerSet whose pods would crash-loop, a Degraded resource instead."""
    monkeypatch.setattr(runtime_support, "RUNS_MULTI_NODE", False)
    cluster.apply_crd(lws_crd)
    start_operator()
    path = create_llmd("multi-node")
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Degraded" and c
    )
    degraded = next(c for c in cr["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RuntimeUnsupported"
    assert "does not run multi-node groups yet" in degraded["message"]
    assert cluster.get(LWS) is None and cluster.get(DEPLOYMENT) is None


def test_operator_runs_scales_and_mirrors_a_leader_worker_set(
    cluster: Any, create_llmd: Any, start_operator: Any, lws_crd: dict[str, Any]
) -> None:
    cluster.apply_crd(lws_crd)
    start_operator()  # after the CRD: kopf finds the LeaderWorkerSet API at start
    path = create_llmd("multi-node")
    lws = cluster.wait_for(lambda: cluster.get(LWS))
    [owner] = lws["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("LLMDeployment", cluster.get(path)["metadata"]["uid"])
    assert group_of(lws)["size"] == 2 and lws["spec"]["replicas"] == 1
    assert cluster.get(DEPLOYMENT) is None
    assert cluster.get(SERVICE)["spec"]["selector"][names.LWS_WORKER_INDEX_LABEL] == "0"

    # LeaderWorkerSet's controller reports its group ready: the resource is Ready.
    ready = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}
    assert cluster.patch(LWS + "/status", {"status": ready}).status_code == 200
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Ready" and c
    )
    assert cr["status"]["readyReplicas"] == 1
    assert cr["status"]["endpoint"] == "http://llama-405b.ml.svc.cluster.local:8000/v1"

    # More replicas: more groups of the same pods (the templates do not change).
    assert cluster.patch(path, {"spec": {"replicas": 3}}).status_code == 200
    scaled = cluster.wait_for(lambda: (w := cluster.get(LWS)) and w["spec"]["replicas"] == 3 and w)
    assert group_of(scaled) == group_of(lws)
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c["status"]["phase"] != "Ready" and c
    )
    ready = next(c for c in cr["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "1/3 replicas ready" in ready["message"]

    # Fitting one pod again: a Deployment, and the LeaderWorkerSet is pruned.
    smaller = {"engine": {"pipelineParallelSize": 1}, "model": {"parameterCount": "70B"}}
    assert cluster.patch(path, {"spec": smaller}).status_code == 200
    cluster.wait_for(lambda: cluster.get(DEPLOYMENT) and cluster.get(LWS) is None)
    selector = cluster.get(SERVICE)["spec"]["selector"]
    assert names.LWS_WORKER_INDEX_LABEL not in selector


def test_without_leader_worker_set_installed_the_resource_is_degraded_until_it_is(
    cluster: Any, create_llmd: Any, start_operator: Any, lws_crd: dict[str, Any]
) -> None:
    start_operator()
    path = create_llmd("multi-node")
    cr = cluster.wait_for(
        lambda: (c := cluster.get(path)) and c.get("status", {}).get("phase") == "Degraded" and c
    )
    degraded = next(c for c in cr["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "APINotInstalled"
    assert degraded["message"].startswith(
        "the cluster does not serve LeaderWorkerSet (leaderworkerset.x-k8s.io/v1): install "
        "LeaderWorkerSet (github.com/kubernetes-sigs/lws)"
    )
    # Retried with backoff (0.2 s doubling in the tests): installing it is enough.
    cluster.apply_crd(lws_crd)
    cluster.wait_for(lambda: cluster.get(LWS))
    cluster.wait_for(
        lambda: next(
            c["status"] == "False"
            for c in cluster.get(path)["status"]["conditions"]
            if c["type"] == "Degraded"
        )
    )
