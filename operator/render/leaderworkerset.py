"""The runtime LeaderWorkerSet: a multi-node replica is one group of pods (kubernetes-sigs/lws).

Rendered instead of the Deployment when a replica needs more GPUs than one pod has
(`LLMDeployment.group_size` > 1, see parallel_checks.py):

    LeaderWorkerSet <name>        replicas = groups; the scale subresource (HPA, KEDA) too
      group 0: leader   pod  `pinnace serve`, node rank 0: the API server and ranks 0..n-1
               worker 1 pod  `pinnace serve`, node rank 1: ranks only, no API
               ...
      group 1: ...

Every pod runs the same args; LeaderWorkerSet gives each one its place in the group as
environment (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX), which `pinnace serve`
reads when no --nnodes/--node-rank/--master-addr is given. The Service selects leaders only.

Start-up order is `LeaderCreated`, not `LeaderReady`: the leader is Ready once the model
is loaded on every rank, which needs the workers, so waiting for it would never start
them. The workers find the leader before it is Ready (LWS's headless Service publishes
not-ready addresses) and the rendezvous waits for them. One failed pod recreates its whole
group (`RecreateGroupOnPodRestart`): the ranks of a group only start together.
"""

from __future__ import annotations

from typing import Any

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment
from pinnace.operator.render import labels
from pinnace.operator.render.deployment import pod_template, with_pod_hash

# What only the API-serving leader has: probes and ports of the HTTP server, the preStop
# pause that lets endpoints drop it. Workers are watched by their group instead.
_LEADER_ONLY = ("ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle")


def render_leader_worker_set(llmd: LLMDeployment) -> dict[str, Any]:
    rollout = llmd.spec.rollout  # RollingUpdate only (parse refuses Recreate)
    spec: dict[str, Any] = {
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {
            "type": "RollingUpdate",
            # In groups, as the Deployment's are in pods.
            "rollingUpdateConfiguration": {
                "maxSurge": rollout.surge,
                "maxUnavailable": rollout.unavailable,
            },
        },
        "leaderWorkerTemplate": {
            "size": llmd.group_size,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": with_pod_hash(pod_template(llmd)),
            "workerTemplate": with_pod_hash(worker_template(llmd)),
        },
    }
    if llmd.replicas is not None:  # autoscaled: the HPA/KEDA is the count's only writer
        spec = {"replicas": llmd.replicas, **spec}
    lws = {
        "apiVersion": names.LWS_API_VERSION,
        "kind": names.LWS_KIND,
        "metadata": labels.metadata(llmd, llmd.name),
        "spec": spec,
    }
    return labels.stamp_applied_hash(lws)


def worker_template(llmd: LLMDeployment) -> dict[str, Any]:
    """The leader's pod without what serves the API."""
    template = pod_template(llmd)
    [container] = template["spec"]["containers"]
    for key in _LEADER_ONLY:
        container.pop(key, None)
    template["spec"].pop("readinessGates", None)
    return template
