#!/usr/bin/env bash
# The GPU training benchmark on one CUDA GPU (prepared for an H200; about 3 minutes): three fresh processes
# (batch 256 and 512 with the model's per-batch input checks, batch 512 without), then the `training_gpu`
# section of benchmarks/RESULTS.md from their JSON results.  Run from the repository root:
#
#     bash benchmarks/gpu_training.sh            # results also go to $OUT when it is set
#
# Each run stops after 150 s at most, so the whole script stays under 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-$(mktemp -d)} PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script needs a GPU")' || exit 2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
for args in "--batch-size 256" "--batch-size 512" "--batch-size 512 --no-check-inputs"; do
    # shellcheck disable=SC2086  # the arguments are meant to split
    timeout 150 "$PY" benchmarks/gpu_training.py $args --no-write 2>&1 | tee -a "$OUT/gpu_training.log"
done
shopt -s nullglob
results=("$OUT"/gpu_training-*.json)
if [ ${#results[@]} -eq 0 ]; then
    echo "no run finished: see $OUT/gpu_training.log" >&2
    exit 1
fi
"$PY" benchmarks/gpu_training.py --render "${results[@]}" --command "bash benchmarks/gpu_training.sh (gpu_training.py \
    --batch-size 256 | --batch-size 512 | --batch-size 512 --no-check-inputs)"
echo "results in $OUT"
