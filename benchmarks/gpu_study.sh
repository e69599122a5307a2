#!/usr/bin/env bash
# The study of issue 9 on one borrowed GPU: both regimes (clean and 40% label noise), each with its ρ pilot
# on the validation split, every arm at 3 seeds, run side by side as many small processes on the one GPU.
# Run from the repository root, after benchmarks/gpu.sh if both are run in one device call.
#
# Fashion-MNIST must travel with the working tree in the git-ignored .carry/fashion-mnist/ (the four
# *-ubyte.gz files); prepare it once here:
#
#   mkdir -p .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .carry/fashion-mnist/
#
# Then, on the GPU machine (it must carry .carry):
#
#   bash benchmarks/gpu_study.sh                      # budget: 8 minutes (STUDY_BUDGET_S, default 470 s)
#   NORMSAM_GPU_SMOKE=1 bash benchmarks/gpu_study.sh  # the same pipeline on the CPU, synthetic data, 1 epoch
#
# Run folders (without checkpoints) land in $OUT/ (default gpu-out/); back here, make the reports with
#   normsam report gpu-out/gpu-study-noise/main --out docs/results/gpu-study-noise/report   (and the same for clean)
# A study cut by the budget resumes where it stopped when started again on the same machine.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
SMOKE=${NORMSAM_GPU_SMOKE:-0}
BUDGET=${STUDY_BUDGET_S:-470}
RUNS=${STUDY_RUNS:-runs}
begin=$SECONDS

if [ "$SMOKE" = 1 ]; then
  # Tiny synthetic data on the CPU: checks the whole pipeline (pilot, choice, phases, placeholders) in seconds.
  common=(device=cpu data=synthetic image_size=8 subset=100 epochs=1 batch_size=32 eval_batch_size=256
          sharpness_steps=1 warmup_epochs=0 eval_every=1)
  workers=(--workers 2)
else
  DATA_DIR=${DATA_DIR:-$PWD/.carry/fashion-mnist}
  if ! ls "$DATA_DIR"/train-images-idx3-ubyte.gz >/dev/null 2>&1; then
    echo "Fashion-MNIST not found in $DATA_DIR: copy the four *-ubyte.gz files into .carry/fashion-mnist/ and carry it." >&2
    exit 2
  fi
  common=(device=cuda "data_dir=$DATA_DIR")
  workers=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_study_device.txt"
fi

# The two regimes side by side; each study is restartable, and the budget stops both cleanly.
declare -A pids
for regime in noise clean; do
  timeout --signal=INT --kill-after=20 "$BUDGET" \
    $PY -m normsam study "configs/study/gpu-$regime.yaml" "${common[@]}" --out "$RUNS/gpu-study-$regime" \
    "${workers[@]}" --no-report > "$OUT/gpu_study_$regime.log" 2>&1 &
  pids[$regime]=$!
done
status=0
for regime in noise clean; do
  wait "${pids[$regime]}"; rc=$?
  tail -n 3 "$OUT/gpu_study_$regime.log"
  if [ $rc = 124 ]; then echo "gpu_study.sh: the $regime study was cut by the ${BUDGET}s budget; start it again to finish";
  elif [ $rc != 0 ]; then echo "gpu_study.sh: the $regime study failed (exit $rc); see $OUT/gpu_study_$regime.log"; fi
  [ $rc = 0 ] || status=1
done

# Bring back everything but the checkpoints (the reports are made from configs, metrics and summaries).
for regime in noise clean; do
  src="$RUNS/gpu-study-$regime"
  [ -d "$src" ] || continue
  (cd "$(dirname "$src")" && find "$(basename "$src")" -type f ! -name '*.pt' -print0 \
     | tar --null -T - -cf - ) | tar -xf - -C "$OUT"
done
echo "gpu_study.sh: $((SECONDS - begin)) s wall-clock; run folders in $OUT/gpu-study-{noise,clean}"
exit $status
