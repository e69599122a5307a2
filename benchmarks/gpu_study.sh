#!/usr/bin/env bash
# The regime study of issue 14 on one borrowed GPU (configs/study/gpu-regime.yaml): the design of the CPU
# study at full Fashion-MNIST scale. First the regime gate (SGD alone on noisy and on clean labels; the study
# stops if the noise costs SGD less than 5 test-accuracy points), then the ρ pilot on the validation split
# (2 seeds per ρ, the grid extended at an edge), then SGD / SAM-all / SAM-ON at 5 seeds in fp32 and bf16, and
# the ablations, late-phase SAM-ON, ascent_interval=4 and the momentum ascent at 3 seeds, as many small
# processes side by side on the one GPU. Run from the repository root, after benchmarks/gpu.sh if both are
# run in one device call.
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
# Run folders (without checkpoints) land in $OUT/gpu-study-regime (default gpu-out/); back here, make the
# report with
#   normsam report gpu-out/gpu-study-regime/main gpu-out/gpu-study-regime/extra --out docs/results/gpu-study-regime/report
# (the gate's figures are in gpu-out/gpu-study-regime/gate.md). A study cut by the budget resumes where it
# stopped when started again on the same machine; the exit status is 3 when the regime gate is not met.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
SMOKE=${NORMSAM_GPU_SMOKE:-0}
BUDGET=${STUDY_BUDGET_S:-470}
RUNS=${STUDY_RUNS:-runs}
STUDY=${STUDY_FILE:-configs/study/gpu-regime.yaml}
begin=$SECONDS

if [ "$SMOKE" = 1 ]; then
  # Tiny synthetic data on the CPU: checks the whole pipeline (gate, pilot, choice, phases, placeholders) in a
  # minute. Its 1-epoch runs cannot show a noise cost, so the gate's margin is 0 here (the gate still runs).
  # Two epochs, and the late-phase arm's SAM window (sam_start: [30] of 60 epochs) moved to the second, so
  # that every arm still trains what its label says (a window after the last epoch is refused).
  common=(device=cpu data=synthetic image_size=8 subset=100 epochs=2 batch_size=32 eval_batch_size=256
          sharpness_steps=1 warmup_epochs=0 eval_every=1 model=resnet8)
  options=(--workers 2 --gate-margin 0)
  sed -E 's/sam_start: \[[0-9]+\]/sam_start: [1]/' "$STUDY" > "$OUT/smoke-study.yaml"
  STUDY="$OUT/smoke-study.yaml"
else
  DATA_DIR=${DATA_DIR:-$PWD/.carry/fashion-mnist}
  if ! ls "$DATA_DIR"/train-images-idx3-ubyte.gz >/dev/null 2>&1; then
    echo "Fashion-MNIST not found in $DATA_DIR: copy the four *-ubyte.gz files into .carry/fashion-mnist/ and carry it." >&2
    exit 2
  fi
  common=(device=cuda "data_dir=$DATA_DIR")
  options=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_study_device.txt"
fi

timeout --signal=INT --kill-after=20 "$BUDGET" \
  $PY -m normsam study "$STUDY" "${common[@]}" --out "$RUNS/gpu-study-regime" "${options[@]}" --no-report \
  > "$OUT/gpu_study_regime.log" 2>&1
rc=$?
tail -n 4 "$OUT/gpu_study_regime.log"
grep -h "^gate:" "$OUT/gpu_study_regime.log" || true
status=0
if [ $rc = 124 ]; then echo "gpu_study.sh: the study was cut by the ${BUDGET}s budget; start it again to finish"; status=1
elif grep -q "Regime gate not met" "$OUT/gpu_study_regime.log"; then
  echo "gpu_study.sh: the regime gate was not met; the reported runs did not start (see gate.md)"; status=3
elif [ $rc != 0 ]; then echo "gpu_study.sh: the study failed (exit $rc); see $OUT/gpu_study_regime.log"; status=1; fi

# Bring back everything but the checkpoints (the reports are made from configs, metrics and summaries).
src="$RUNS/gpu-study-regime"
if [ -d "$src" ]; then
  (cd "$(dirname "$src")" && find "$(basename "$src")" -type f ! -name '*.pt' -print0 \
     | tar --null -T - -cf - ) | tar -xf - -C "$OUT"
fi
echo "gpu_study.sh: $((SECONDS - begin)) s wall-clock; run folders in $OUT/gpu-study-regime"
exit $status
