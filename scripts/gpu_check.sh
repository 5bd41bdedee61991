#!/usr/bin/env bash
# The one device check for a session lent a GPU (5–7 minutes): the GPU-marked tests, the
# kernel-vs-twin and CUDA-graph timings (benchmarks/gpu_check.py), then the drafters on the GPU
# (dspark bench --config configs/bench/gpu.yaml). Results land in $OUT (or ./gpu_out), at most
# eight files: device.txt, gpu_tests.txt, gpu_check.{json,md,log}, bench_gpu.{json,md}, bench.log.
#
# Every step has its own time limit, so a step that hangs or fails leaves the others' results.
# The device image has torch, triton, transformers, lightning, safetensors, pytest and hypothesis
# but not omegaconf: carry its wheels (and antlr4-python3-runtime's) in .whl/ — see docs/kernels.md.
# A transformers wheel carried there too replaces the image's (to run the version tested here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels only; nothing is fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
    nproc
} > "$OUT/device.txt" 2>&1

per_test=()  # pytest-timeout is in the image; a hung test then fails alone
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -m gpu -p no:cacheprovider "${per_test[@]}" -rA --durations=10 tests \
    > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
tail -5 "$OUT/gpu_tests.txt"

timeout 210 python3 benchmarks/gpu_check.py --out "$OUT" --deadline-s 150 ${GPU_CHECK_ARGS:-} > "$OUT/gpu_check.log" 2>&1
check_rc=$?
tail -25 "$OUT/gpu_check.log"

timeout ${BENCH_TIMEOUT:-200} python3 -m dspark.cli bench --config configs/bench/gpu.yaml output_dir=/tmp/bench_gpu \
    > "$OUT/bench.log" 2>&1
bench_rc=$?
cp /tmp/bench_gpu/bench.json "$OUT/bench_gpu.json" 2>/dev/null
cp /tmp/bench_gpu/bench.md "$OUT/bench_gpu.md" 2>/dev/null
tail -30 "$OUT/bench.log"

echo "gpu tests rc=$tests_rc, gpu_check rc=$check_rc, bench rc=$bench_rc"
exit $(( tests_rc || check_rc || bench_rc ))
