#!/usr/bin/env bash
# The one device check for a session lent a GPU (about 8 minutes): the GPU-marked tests, then
# kernel-vs-twin and CUDA-graph timings (benchmarks/gpu_check.py). Results land in $OUT (or ./gpu_out).
#
# The device image has torch, triton, transformers, lightning, safetensors, pytest and hypothesis but
# not omegaconf: carry its wheels (and antlr4-python3-runtime's) in .whl/ — see docs/kernels.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels only; nothing is fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 300 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, gpu_check rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
