#!/usr/bin/env bash
# GPU smoke run (about 3 minutes on one GPU): both stages with mixed precision, kill -9 and --resume, seeded
# DDIM/DDPM sampling twice, torchrun process groups (2 processes gloo, 1 process NCCL, 2 NCCL with 2+ GPUs),
# estimator vs torch.cuda.max_memory_allocated, reserved memory beside it.
# Exit code: the number of failed checks. Log: benchmarks/results/gpu_smoke.log (or $1).
#
# On a machine without monai/nibabel (e.g. the lent device machine, which has no package registry), carry
# wheels in .whl/ (see docs/gpus.md); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:-benchmarks/results/gpu_smoke.log}"
source benchmarks/_python.sh
mkdir -p "$(dirname "$log")"
"$python" benchmarks/gpu_smoke.py --device "${DEVICE:-cuda}" ${TINY:+--tiny} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
