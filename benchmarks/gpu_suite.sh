#!/usr/bin/env bash
# GPU suite (about 8 minutes on one GPU): the guide's examples trained on whole volumes and on patches,
# measured (torch.cuda.max_memory_allocated, step time) against the estimator, and the whole-volume tiled
# encode/decode of Example 4. Table: benchmarks/results/gpu_suite.md (or $1), written row by row as each
# finishes; a failed row records its error and the suite goes on (exit code 1 if any row failed).
# On a machine without monai/nibabel, carry their wheels in .whl/ (see docs/gpus.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_suite.md}"
source benchmarks/_python.sh
mkdir -p "$(dirname "$out")"
"$python" benchmarks/gpu_suite.py --device "${DEVICE:-cuda}" ${TINY:+--tiny} --output "$out"
