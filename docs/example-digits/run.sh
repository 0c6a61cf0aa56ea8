#!/usr/bin/env bash
# The README's worked example: online vs spaced KD on the embedded digits data, 3 seeds each, then
# the flatness of every best student and the comparison. Digits is a toy: the paper's claims are
# about CIFAR-100 and Tiny-ImageNet. Run from the repository root:
#   bash docs/example-digits/run.sh [RUNS_DIR]        (default runs/example-digits)
# The two groups train side by side on one thread each (on a 2-core CPU this beats one run on two
# threads); within a group the seeds run in turn.
set -euo pipefail
RUNS=${1:-runs/example-digits}
DOCS=${DOCS:-docs/example-digits}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-0,1,2}
PROBES=${PROBES:-64}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$RUNS"
COMMON=(--dataset digits --arch resnet18 --model-kwargs downsample_factor=16 --epochs "$EPOCHS"
        --device cpu --no-progress --seeds "$SEEDS")
start=$(date +%s)
pids=()
for mode in online spaced; do
  "$PY" -m spacedkd_fast.train "${COMMON[@]}" --mode "$mode" --out "$RUNS/$mode" \
    > "$RUNS/$mode.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "a training group failed; see $RUNS/*.log" >&2; exit 1; }
done
echo "trained ($(( $(date +%s) - start )) s)"
mkdir -p "$DOCS"
for mode in online spaced; do cp "$RUNS/$mode.log" "$DOCS/train-$mode.log"; done
"$PY" -m spacedkd_fast.flatness "$RUNS" --samples "$PROBES" --device cpu --out "$DOCS" \
  | tee "$DOCS/flatness.txt"
"$PY" -m spacedkd_fast.compare "$RUNS" --out "$DOCS"
echo "total $(( $(date +%s) - start )) s"
