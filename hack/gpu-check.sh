#!/usr/bin/env bash
# GPU check, offline: the gpu-marked tests and hack/bench/gpu.py, one JSON summary at the end.
#
#   hack/gpu-check.sh [--wheels DIR] [--python PY] [--dry-run]
#
# Uses the machine's own python3 (its preinstalled torch / transformers) through a venv with
# --system-site-packages (.gpu-venv; a --python inside a venv is used directly), installs this checkout --no-deps, and any requirement
# that python lacks from DIR (no index, no network). If DIR lacks one, the script stops and
# prints the exact `pip download` line that fills DIR, to run on a machine with network and
# the same Python version and platform, e.g. (FlashInfer 0.6.x is ~8 MB; its JIT compiles
# kernels with the machine's nvcc on first use):
#
#   pip download -d gpu-wheels --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 'flashinfer-python>=0.6,<0.7' apache-tvm-ffi \
#     <the missing pure-python requirements the script names>
#
# --dry-run: CPU only, tiny sizes (bench wiring, no gpu tests): what CI can run.
# Budget: under 8 minutes on an H100/H200 (tests ~2 min, bench ~4 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3 WHEELS="" DRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$(cd "$2" && pwd); shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: hack/gpu-check.sh [--wheels DIR] [--python PY] [--dry-run]" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
OUT=$(mktemp -d)
VENV=.gpu-venv
# -I / -P: never import from the checkout's root (./operator would shadow the stdlib's).
# A --python that is already a virtual environment's is used as it is.
if "$PY" -I -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  VPY=$PY
else
  [ -x "$VENV/bin/python" ] || "$PY" -I -m venv --system-site-packages "$VENV"
  VPY=$VENV/bin/python
fi
PIP=("$VPY" -I -m pip install -q --disable-pip-version-check --no-index --no-build-isolation)
[ -n "$WHEELS" ] && PIP+=(--find-links "$WHEELS")

# Requirements this python lacks: the project's, the test tools', FlashInfer (not in dry runs).
missing=$("$VPY" hack/gpu_requirements.py ${DRY:+--no-gpu})
if [ -n "$missing" ]; then
  if [ -z "$WHEELS" ] || ! eval "\"\${PIP[@]}\" --no-deps $missing"; then
    echo "missing requirements: $missing" >&2
    echo "fill a wheel folder on a machine with network (same Python and platform):" >&2
    pyver=$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "  pip download -d gpu-wheels --no-deps --only-binary=:all: --python-version $pyver" \
         "--platform manylinux_2_28_x86_64 $missing" >&2
    echo "then: hack/gpu-check.sh --wheels gpu-wheels" >&2
    exit 2
  fi
fi
"${PIP[@]}" --no-deps -e . >/dev/null

tests_rc=0
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$VPY" -P -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
    tests/gpu tests/runtime/quantization/test_layers.py | tail -15 || tests_rc=$?
else
  bash -n hack/gpu-check.sh
fi
bench_rc=0
"$VPY" hack/bench/gpu.py ${DRY:+--dry-run} --out "$OUT/bench.json" >/dev/null || bench_rc=$?
"$VPY" - "$OUT" "$tests_rc" "$bench_rc" "$START" "${DRY:-0}" <<'PY'
import json, os, sys, time
import xml.etree.ElementTree as ET
out, tests_rc, bench_rc, start, dry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
tests = None
xml = os.path.join(out, "gpu-tests.xml")
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s[0]
    tests = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench_path = os.path.join(out, "bench.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
ok = tests_rc == 0 and bench_rc == 0 and (dry or (tests is not None and tests["tests"] > 0))
print(json.dumps({"gpu_check": "green" if ok else "red", "dry_run": dry, "tests": tests,
                  "tests_rc": tests_rc, "bench_rc": bench_rc, "bench": bench,
                  "seconds": round(time.time() - start)}))
sys.exit(0 if ok else 1)
PY
