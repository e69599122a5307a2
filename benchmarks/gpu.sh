#!/usr/bin/env bash
# The GPU checks of normsam, prepared for one run on a borrowed H100/H200 (see docs/benchmarks.md).
# Run from the repository root; needs python3 with torch, torchvision and timm (the lent machines have
# them) and no install: the package is used from src/. Figures and logs go to $OUT (default gpu-out/).
#
#   bash benchmarks/gpu.sh            # about 6-8 minutes on an H100 (not yet timed: first run pending)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

# 1. correctness on CUDA: cheap ascent, bf16, fp16 + GradScaler, torch.compile, the runner
$PY benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.txt" || status=1

# 2. timing (CUDA events) and peak memory of SGD / SAM-all / SAM-ON, interleaved rounds
bench() {  # name, then normsam bench arguments
  local name=$1; shift
  echo "== $name" | tee -a "$OUT/bench.md"
  $PY -m normsam bench --device cuda "$@" --json "$OUT/bench-$name.json" 2>/dev/null | tee -a "$OUT/bench.md" || status=1
}
bench resnet20-fp32      --model resnet20  --batch-size 128 --rounds 20 --steps-per-round 10
bench resnet20-bf16      --model resnet20  --batch-size 128 --rounds 20 --steps-per-round 10 --amp bf16
bench wrn16-8-bf16       --model wrn16-8   --batch-size 128 --rounds 10 --steps-per-round 5  --amp bf16
bench vit-small-bf16     --model vit-small --batch-size 128 --rounds 10 --steps-per-round 5  --amp bf16
bench resnet20-bf16-compile --model resnet20 --batch-size 128 --rounds 10 --steps-per-round 10 --amp bf16 \
      --compile --no-handwritten --warmup 3
exit $status
