#!/usr/bin/env bash
# GPU check for a lent CUDA machine: the gpu-marked tests, then decode throughput.
# Usage: hack/gpu-check.sh   (from the repository root; sets up .venv with CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
make setup-test TORCH_SPEC=torch >/dev/null
.venv/bin/pytest -q -m gpu tests/gpu
cd /tmp
for bs in 1 32; do
  "$OLDPWD/.venv/bin/python" "$OLDPWD/hack/bench/throughput.py" --batch-size "$bs" \
    --num-prompts "$bs" --skip-transformers
done
