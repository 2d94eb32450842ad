#!/usr/bin/env bash
# End to end on a laptop: a kind cluster, both images built and loaded into it, the Helm
# chart installed, the minimal CPU example served (SmolLM2-135M, baked into the runtime
# image: no download, no GPU), and one chat completion through a port-forward.
#
#   hack/kind-e2e.sh              run it (needs docker, kind, kubectl, helm, curl)
#   hack/kind-e2e.sh --keep       ... and leave the cluster up afterwards
#   hack/kind-e2e.sh --dry-run    print the commands it would run, run nothing
#
# CI cannot run this (no Docker engine there); tests/operator/test_kind_e2e.py runs the
# dry run and checks that every path, image, target and name it uses is the real one.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-pinnace-e2e}"
LOCAL_PORT="${LOCAL_PORT:-18000}"
CHART=helm/pinnace
EXAMPLE=examples/minimal-cpu.yaml
# The chart's appVersion tags both images; the operator's default runtime image and the
# chart's default operator image are ghcr.io/pinnace/{runtime,operator}:<appVersion>.
VERSION="$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' "$CHART/Chart.yaml")"
RUNTIME_IMAGE="ghcr.io/pinnace/runtime:${VERSION}"
OPERATOR_IMAGE="ghcr.io/pinnace/operator:${VERSION}"
# From the example: the resource's name (also its Service), namespace, port and model name.
NAME=smollm2
NAMESPACE=default
PORT=8000
MODEL=smollm2

DRY_RUN=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

# Every step goes through `run`: printed, and executed unless --dry-run.
run() {
  echo "+ $*"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

if [[ "$DRY_RUN" == 0 ]]; then
  for tool in docker kind kubectl helm curl; do
    command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is not installed" >&2; exit 1; }
  done
fi

FORWARD_PID=""
cleanup() {
  if [[ -n "$FORWARD_PID" ]]; then kill "$FORWARD_PID" 2>/dev/null || true; fi
  if [[ "$KEEP" == 0 ]]; then run kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

run kind create cluster --name "$CLUSTER" --wait 120s
# The gRPC server's proto: KServe's, from the shared data beside this repository.
run docker build --target runtime --build-context oip-proto=../shared/data/kserve-v0.20.0/predict-api-v2 \
  -t "$RUNTIME_IMAGE" .
run docker build --target operator -t "$OPERATOR_IMAGE" .
run kind load docker-image --name "$CLUSTER" "$RUNTIME_IMAGE" "$OPERATOR_IMAGE"

# The chart's defaults already name these images; --set spells out what is under test.
run helm install pinnace "$CHART" --namespace pinnace-system --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="$VERSION" \
  --wait --timeout 5m

run kubectl apply --namespace "$NAMESPACE" -f "$EXAMPLE"
# Ready = the runtime pod passed its readiness probe (the model is loaded).
run kubectl wait --namespace "$NAMESPACE" "llmdeployment/$NAME" --for=condition=Ready --timeout=10m
run kubectl get --namespace "$NAMESPACE" llmdeployment "$NAME"

echo "+ kubectl port-forward --namespace $NAMESPACE svc/$NAME $LOCAL_PORT:$PORT &"
if [[ "$DRY_RUN" == 0 ]]; then
  kubectl port-forward --namespace "$NAMESPACE" "svc/$NAME" "$LOCAL_PORT:$PORT" >/dev/null &
  FORWARD_PID=$!
  for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$LOCAL_PORT/health" >/dev/null && break
    sleep 1
  done
fi

BODY="{\"model\": \"$MODEL\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
echo "+ curl -sf http://127.0.0.1:$LOCAL_PORT/v1/chat/completions -d '$BODY'"
if [[ "$DRY_RUN" == 0 ]]; then
  answer="$(curl -sf "http://127.0.0.1:$LOCAL_PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' -d "$BODY")"
  echo "$answer"
  grep -q '"choices"' <<<"$answer" || { echo "kind-e2e: no completion in the answer" >&2; exit 1; }
  echo "kind-e2e: OK"
fi
