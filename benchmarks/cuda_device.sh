#!/usr/bin/env bash
# One GPU session's checks, in one command: benchmarks/cuda_report.py (groups in this order: one BRA layer per
# attn_impl incl. 'triton', biformer_small per attn_impl, eval/train against the Swins, the same under
# torch.compile, a training-step profile, detection size), then the CUDA tests ('triton' in fp32 and autocast).
#
#   bash benchmarks/cuda_device.sh [OFFICIAL_BIFORMER_CLONE] [OUTPUT_DIR]
#
# Run from the repository root on a machine with a CUDA GPU and torch; wheels in .whl/ (e.g. fvcore, iopath, a
# timm the package supports) are installed into /tmp/site first when present. Writes OUTPUT_DIR/cuda.json (default
# benchmarks/results/), OUTPUT_DIR/pytest.log and OUTPUT_DIR/report.log. REPORT_DEADLINE (seconds, default 300)
# bounds when the report starts its last group; TEST_TIMEOUT (default 200) bounds the tests (pytest-timeout: 60 s
# each); COMMIT names the commit measured where the tree has no usable git metadata.
set -uo pipefail
official=${1:-}
out=${2:-benchmarks/results}
mkdir -p "$out"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import torch, timm, triton; print("torch", torch.__version__, "timm", timm.__version__, "triton", triton.__version__)'
python3 benchmarks/cuda_report.py ${official:+--official-biformer "$official"} --out "$out/cuda.json" ${COMMIT:+--commit "$COMMIT"} \
  --deadline "${REPORT_DEADLINE:-300}" 2>&1 | tee "$out/report.log" | grep -v Warning | tail -60
# -v: one line per test as it ends, so a run cut off by the timeout still shows what passed and failed
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -v -p no:cacheprovider --timeout 60 tests/test_cuda.py \
  tests/test_hardening.py -k 'cuda' --no-header -rfEs --tb=short 2>&1 | tee "$out/pytest.log" | tail -40
