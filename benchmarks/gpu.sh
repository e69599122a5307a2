#!/usr/bin/env bash
# The GPU checks and the GPU step-time table of normsam, for one run on a borrowed H100/H200
# (see docs/benchmarks.md). Run from the repository root. Needs python3 with torch and timm (the lent
# machines have them) and no network: normsam is used from src/, and the yardstick pytorch_optimizer is
# installed from .carry/wheels/ when that folder travels with the tree (without it the peer's column
# says "not installed"). Prepare it once, on a machine with network access:
#
#   pip download pytorch_optimizer --no-deps -d .carry/wheels      # .carry/ is git-ignored
#
# Then, on the GPU machine (it must carry .carry):
#
#   bash benchmarks/gpu.sh                     # budget: under 5 minutes on an H100 (checks, table, variants)
#   NORMSAM_GPU_SMOKE=1 bash benchmarks/gpu.sh # the same steps on the CPU with tiny settings (seconds)
#
# Logs and JSON go to $OUT (default gpu-out/). Exit status 1 if a check or a step fails.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${NORMSAM_GPU_SMOKE:-0}
smoke_flag=()
[ "$SMOKE" = 1 ] && smoke_flag=(--smoke)
status=0
begin=$SECONDS

# The yardstick, from the carried wheel, into a folder of the tree (no site-packages needed).
if ! $PY -c "import pytorch_optimizer" 2>/dev/null && compgen -G ".carry/wheels/pytorch_optimizer-*.whl" >/dev/null; then
  $PY -m pip install --quiet --no-index --no-deps --find-links .carry/wheels --target .carry/site pytorch_optimizer \
    && export PYTHONPATH="$PYTHONPATH:$PWD/.carry/site" \
    || echo "could not install pytorch_optimizer from .carry/wheels; the peer's column will say why"
fi

{
  if [ "$SMOKE" = 1 ]; then echo "SMOKE MODE: CPU, tiny settings"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; fi
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  $PY -c "import pytorch_optimizer as p; print('pytorch_optimizer', p.__version__)" 2>/dev/null \
    || echo "pytorch_optimizer: not installed"
} | tee "$OUT/gpu.txt"

# 1. correctness on CUDA: no host sync in SAM's steps, cheap = classic, bf16, fp16 + GradScaler, compile, runner
$PY benchmarks/gpu_checks.py "${smoke_flag[@]}" 2>&1 | tee "$OUT/checks.txt" || status=1
echo "checks done after $((SECONDS - begin)) s" | tee -a "$OUT/checks.txt"

# 2. one table: WRN-28-10, ResNet-56, ViT-S/32, ResNet-50; bf16, batch 128; SGD, peer, SAM-all, SAM-ON,
#    SAM-ON with ascent_interval=4, the hand-written floor; CUDA-event timings, ratios, extra peak memory
$PY benchmarks/step_time.py --mode gpu "${smoke_flag[@]}" --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench.md" || status=1
# 3. SAM's variants beside pytorch_optimizer's classes (issue 25), on one model: ResNet-56, bf16, batch 128, where
#    on an H100 the optimizer's own kernels are a visible share of the step (about a minute)
variants_smoke=(--model resnet56 --batch-size 128 --image-size 32 --amp bf16 --rounds 5 --steps-per-round 8)
[ "$SMOKE" = 1 ] && variants_smoke=(--model resnet20 --batch-size 2 --image-size 8 --rounds 1 --steps-per-round 1 --warmup 0 --no-memory)
$PY -m normsam bench "${variants_smoke[@]}" --variants --json "$OUT/bench-variants.json" 2>&1 | tee "$OUT/bench-variants.md" || status=1
echo "gpu.sh done after $((SECONDS - begin)) s (status $status)" | tee -a "$OUT/bench.md"
exit $status
