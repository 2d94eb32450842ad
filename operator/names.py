"""Names shared by the CRD, the renderers and the operator: API identity, labels, defaults."""

from __future__ import annotations

GROUP = "pinnace.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("llmd",)

DEFAULT_IMAGE = "ghcr.io/pinnace/runtime:0.1.0"
# The server-side-apply field manager; also names who wrote what in managedFields.
FIELD_MANAGER = "pinnace-operator"

# app.kubernetes.io/* conventions; name+instance form the (immutable) selector.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VERSION = "app.kubernetes.io/version"
APP_NAME = "pinnace"
COMPONENT = "inference"

# Hash of the rendered pod template: changes exactly when pods must roll.
ANNOTATION_POD_SPEC_HASH = f"{GROUP}/pod-spec-hash"
# Hash of a whole rendered child: lets reconcile skip the apply when nothing changed.
ANNOTATION_APPLIED_HASH = f"{GROUP}/applied-hash"
# Escape hatch for the GPU memory fit check (the estimate is deliberately rough).
ANNOTATION_SKIP_FIT_CHECK = f"{GROUP}/skip-fit-check"

# Pod termination, in order: preStop sleeps (endpoints drop the pod), SIGTERM, the runtime
# drains requests in flight for up to the shutdown timeout, then exits; the rest of the
# grace period is margin for closing connections and freeing the GPU before SIGKILL.
TERMINATION_GRACE_SECONDS = 120
PRESTOP_SLEEP_SECONDS = 5
SHUTDOWN_TIMEOUT_SECONDS = TERMINATION_GRACE_SECONDS - PRESTOP_SLEEP_SECONDS - 15

# The runtime pods' readiness gate in Deployment mode with LoRA: the operator sets this pod
# condition once the pod's runtime has loaded the declared adapters, so no pod takes traffic
# (and 404s an adapter the resource declares) before that.
ADAPTERS_GATE = f"{GROUP}/adapters-loaded"

CONTAINER_NAME = "runtime"
PORT_NAME = "http"
# The Open Inference Protocol over gRPC (`serve --grpc-port`): KServe's runtimes' port.
GRPC_PORT = 8081
GRPC_PORT_NAME = "grpc"  # Istio reads the protocol off a `grpc` name prefix
# The Service port's appProtocol (Kubernetes' standard name for HTTP/2 without TLS, which
# Gateway API implementations read to speak HTTP/2 to the backend).
GRPC_APP_PROTOCOL = "kubernetes.io/h2c"

# KServe (serving.mode: KServe): its API group and the names it insists on.
KSERVE_GROUP = "serving.kserve.io"
KSERVE_CONTAINER_NAME = "kserve-container"  # the runtime container KServe merges into
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the weights
KSERVE_MODEL_FORMAT = "pinnace"
KSERVE_PORT_NAME = "http1"  # Knative accepts one port, named http1 or h2c
ANNOTATION_KSERVE_DEPLOYMENT_MODE = f"{KSERVE_GROUP}/deploymentMode"
ANNOTATION_KSERVE_AUTOSCALER_CLASS = f"{KSERVE_GROUP}/autoscalerClass"
LABEL_KSERVE_ISVC = f"{KSERVE_GROUP}/inferenceservice"

# LeaderWorkerSet (kubernetes-sigs/lws): multi-node replicas, one group of pods each.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
# LWS labels every pod of a group with its index in the group; the leader is "0".
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"

# KEDA's Prometheus when autoscaling.prometheusUrl is not set: kube-prometheus-stack's.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
