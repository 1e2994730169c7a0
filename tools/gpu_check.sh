#!/usr/bin/env bash
# One GPU session for the fused kernels: build them once, run the GPU and fused tests (with
# compute-sanitizer's memcheck and racecheck on small cases alongside), then benchmark. The
# benchmark's table is printed last. Everything is also written to $OUT (default /tmp/mp-gpu).
#
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mp-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
exec > >(tee -a "$OUT/log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== build"
start=$SECONDS
python3 - <<'PY' || echo "BUILD FAILED"
import logging
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
logging.getLogger("mp.fused").setLevel(logging.DEBUG)  # the whole compiler error, if any
from mp.fused import load_fused_kernels
print("built:", load_fused_kernels())
PY
echo "build took $((SECONDS - start)) s"

echo "== compute-sanitizer (background) and tests"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 "$sanitizer" --tool "$tool" --error-exitcode 9 \
    --print-limit 20 python3 tests/gpu/kernel_cases.py > "$OUT/sanitizer_$tool.log" 2>&1 &
done
start=$SECONDS
# -v names each test as it ends; a hung kernel blocks the process in C, and pytest-timeout's
# thread method still ends it.
timeout 300 python3 -m pytest -v --tb=short --maxfail=30 -p no:cacheprovider \
  --timeout=60 --timeout-method=thread tests/gpu \
  tests/test_fused_softmax.py tests/test_fused_norm.py tests/test_fused_build.py \
  --deselect tests/test_fused_build.py::test_sources_compile_for_sm80_and_sm90
echo "tests exit $? after $((SECONDS - start)) s"
for job in $(jobs -p); do wait "$job"; done
for tool in memcheck racecheck; do
  echo "-- $tool:"; tail -n 8 "$OUT/sanitizer_$tool.log"
done

echo "== benchmark"
timeout 300 python3 tools/bench_kernels.py | tee "$OUT/bench.md"
