#!/usr/bin/env bash
# Every check the open GPU work needs, in parts that each fit one device call (the device's
# limit is 600 s a call). Each part prints a short table last; everything is also written to
# $OUT (default /tmp/mp-gpu).
#
#   bash tools/gpu_session.sh kernels      # tools/gpu_check.sh: build, tests/gpu (kernels, compiled
#                                          # fusions, grouped-query and multi-latent attention, the
#                                          # KV cache, MoE), bench_kernels
#   bash tools/gpu_session.sh memory       # peak memory of 350M/1.3B against the estimate
#   bash tools/gpu_session.sh training     # fusions, MoE experts (loop, grouped GEMM), bench_gpt
#                                          # four ways (the last compiled)
#   bash tools/gpu_session.sh recompute    # the recompute modules on CUDA: tests/gpu's check and
#                                          # bench_recompute on a DeepSeek-V3-shaped block;
#                                          # bench_window (sliding windows, one call vs tiles);
#                                          # bench_documents (packed documents vs the mask)
#   bash tools/gpu_session.sh fp8          # FP8 linears: tests/gpu's check, bench_fp8 (bf16 vs
#                                          # FP8 eager and compiled), bench_gpt in FP8 (eager,
#                                          # compiled), each beside its plain bf16 baseline
#   bash tools/gpu_session.sh              # all five
#
# CONFIG (default configs/gpt3-1.3b.yaml) is the model bench_gpt runs; a CPU rehearsal of the
# training part: CONFIG=configs/gpt-tiny.yaml bash tools/gpu_session.sh training
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/mp-gpu}
CONFIG=${CONFIG:-configs/gpt3-1.3b.yaml}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(kernels memory training recompute fp8)

bench_gpt() {  # a label, then bench_gpt's arguments
  local label=$1; shift
  echo "== bench_gpt: $label"
  timeout 170 python3 tools/bench_gpt.py --config "$CONFIG" --iters 8 "$@" \
    | tee "$OUT/bench_gpt_$label.txt" | tail -n 4
}

for part in "${parts[@]}"; do
  case $part in
    kernels)
      bash tools/gpu_check.sh ;;
    memory)
      echo "== peak memory against the estimate"
      timeout 300 python3 -m pytest -s -q -p no:cacheprovider tests/test_estimate_gpu.py 2>&1 \
        | tee "$OUT/memory.log" | grep -E "^\||^(sdpa|unfused):|passed|failed|skipped" ;;
    training)
      (
        echo "== fusions"
        timeout 120 python3 tools/bench_fusions.py
        echo "== MoE experts"
        timeout 90 python3 tools/bench_moe_experts.py
        bench_gpt default
        bench_gpt unfused --no-bias-dropout-fusion --no-bias-gelu-fusion \
            --no-cross-entropy-loss-fusion
        bench_gpt no_dropout --hidden-dropout 0 --attention-dropout 0
        bench_gpt compiled --model.compile_layers true --compile-reference
      ) 2>&1 | tee -a "$OUT/training.log" ;;
    recompute)
      (
        echo "== recompute modules on CUDA"
        timeout 150 python3 -m pytest -s -q -p no:cacheprovider tests/gpu/test_gpu_recompute.py \
            tests/gpu/test_gpu_cpu_offload.py
        echo "== bench_recompute: DeepSeek-V3's layer shapes, 2 layers (1 dense, 1 of 16 experts)"
        timeout 400 python3 tools/bench_recompute.py --config configs/deepseek-v3.yaml \
            --micro-batch-size 1 --iters 5 --num-layers 2 --moe-layer-freq "([0]+[1])" \
            --num-experts 16 --moe-router-num-groups 4 --moe-router-group-topk 2 \
            --moe-grouped-gemm --model.mtp_num_layers null \
            --model.num_layers_in_first_pipeline_stage null \
            --model.num_layers_in_last_pipeline_stage null
        echo "== bench_window: sliding windows in one call and in tiles"
        timeout 120 python3 tools/bench_window.py --seq 8192 16384 --window 1024 4096 \
            --dtype bf16 --heads 32 --groups 8 --head-dim 128 --iters 5
        echo "== bench_documents: packed documents against the dense document mask"
        timeout 90 python3 tools/bench_documents.py --seq 4096 8192 --batch 4 --dtype bf16 \
            --heads 32 --groups 8 --head-dim 128 --iters 5
      ) 2>&1 | tee -a "$OUT/recompute.log" ;;
    fp8)
      (
        echo "== FP8 on CUDA"
        timeout 150 python3 -m pytest -s -q -p no:cacheprovider tests/gpu/test_gpu_fp8.py
        echo "== bench_fp8: GPT-3 1.3B's linears in bf16 and FP8"
        timeout 120 python3 tools/bench_fp8.py --iters 10
        # each bench_gpt run times the plain-PyTorch bf16 model beside it, on the same card
        bench_gpt fp8 --fp8-format hybrid
        bench_gpt fp8_compiled --fp8-format hybrid --model.compile_layers true
      ) 2>&1 | tee -a "$OUT/fp8.log" ;;
    *)
      echo "unknown part '$part': expected kernels, memory, training, recompute or fp8" >&2
      exit 2 ;;
  esac
done
