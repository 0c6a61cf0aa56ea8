#!/usr/bin/env bash
# GPU check for a lent GPU machine: no network there; its python3 carries torch (CUDA),
# pytest and pytest-benchmark. Builds the extension in place against that torch, runs the CUDA
# tests and the CUDA benchmarks, and writes logs and a short table to $OUT (default
# ./gpu_results). Each step has its own time limit so that one slow step cannot eat the rest;
# the step limits add up to 480 s (8 minutes); on an H200 the first four steps took 2.5 min.
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export SPACEDKD_BENCH_QUICK="${SPACEDKD_BENCH_QUICK:-1}"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "== GPU check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>&1 | tee -a "$summary"

note "== build (in place, against this machine's torch)"
t0=$(date +%s)
timeout 100 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
note "build rc=$rc in $(( $(date +%s) - t0 ))s"
grep -E "spacedkd_fast build" "$OUT/build.log" | sort -u | tee -a "$summary"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
$PY -m spacedkd_fast.info 2>&1 | tee -a "$summary"

note "== CUDA tests"
timeout 90 $PY -m pytest tests/ops/test_kd_loss.py tests/ops/test_kd_loss_cuda_grad_in_forward.py tests/engine/test_distill*.py \
  tests/engine/test_deferred_checks_cuda.py tests/models/test_models_runtime.py tests/data/test_data_vit_official.py \
  -m cuda -k "not inductor" -q -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
note "cuda tests rc=$?: $(tail -1 "$OUT/tests_cuda.log")"
grep -E "^(FAILED|ERROR)" "$OUT/tests_cuda.log" | head -20 | tee -a "$summary"

note "== CUDA benchmarks (fused KD loss vs eager, bf16)"
# Wall time per call (host + synchronize) in the ratio tables; device time with the host
# excluded (CUDA events), host time per call and the copy_ yardstick of the same bytes in
# kd_loss_device_time.jsonl and the table printed below it.
rm -f "$OUT/kd_loss_device_time.jsonl"
SPACEDKD_BENCH_KERNEL_JSON="$OUT/kd_loss_device_time.jsonl" \
timeout 100 $PY -m pytest benchmarks/test_bench_kd_loss.py -k cuda -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/bench_kd_loss.json" > "$OUT/bench_kd_loss.log" 2>&1
note "bench rc=$?"
sed -n '/ratio tables/,/^---/p' "$OUT/bench_kd_loss.log" | grep -v "^---" | tee -a "$summary"
note "-- device time per call (host excluded), share of copy_ bandwidth, host time per call"
grep -E "^\[kd_loss|^    .* of copy_" "$OUT/bench_kd_loss.log" | tee -a "$summary"

note "== CUDA benchmark: engine, spaced vs online, overlap on/off (ResNet-18 pair)"
timeout 90 $PY -m pytest benchmarks/test_bench_engine.py -k cuda -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_engine.json" > "$OUT/bench_engine.log" 2>&1
note "engine bench rc=$?"
sed -n '/ratio tables/,/^---/p' "$OUT/bench_engine.log" | grep -v "^---" | tee -a "$summary"

note "== CUDA benchmark: ResNet-18 CIFAR-100-shaped spaced epoch, ours vs the official loop"
timeout 100 $PY -m pytest benchmarks/test_bench_train.py -m cuda -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_train.json" > "$OUT/bench_train.log" 2>&1
note "train bench rc=$?"
sed -n '/ratio tables/,/^---/p' "$OUT/bench_train.log" | grep -v "^---" | tee -a "$summary"

note "== CUDA benchmark: the official-code ViTs and ResNet-56, forward+backward, eager vs compile"
timeout 45 $PY -m pytest benchmarks/test_bench_models.py -k "official and cuda" -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_models.json" > "$OUT/bench_models.log" 2>&1
note "models bench rc=$?"
sed -n '/ratio tables/,/^---/p' "$OUT/bench_models.log" | grep -v "^---" | tee -a "$summary"
exit 0
