#!/usr/bin/env bash
# GPU suite (about 8 minutes on one GPU): the guide's examples trained on whole volumes and on patches,
# measured (torch.cuda.max_memory_allocated, step time) against the estimator, and the whole-volume tiled
# encode/decode of Example 4. Table: benchmarks/results/gpu_suite.md (or $1).
# On a machine without monai/nibabel, carry their wheels in .whl/ (see docs/gpus.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_suite.md}"
python="${PYTHON:-python3}"
if ! "$python" -c "import monai, nibabel" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$(dirname "$out")"
"$python" benchmarks/gpu_suite.py --device "${DEVICE:-cuda}" --output "$out"
