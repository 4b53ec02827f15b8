#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) exactly the wheels that a lent GPU machine lacks: it has Python 3.12
# and torch 2.11 with most of our dependencies, but no monai, no nibabel and no package registry (see
# /work/.library/device/KINDS.md). Run it here, where pip reaches PyPI; then carry .whl to the machine
# (docs/gpus.md gives the run command). benchmarks/_python.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
rm -rf .whl && mkdir -p .whl
# pure-Python wheels (monai's own wheel is py3-none-any; nibabel needs importlib-resources only below 3.9)
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl "monai==1.6.1" "nibabel>=5.0"
ls .whl
count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne 2 ]; then
    echo "error: expected 2 wheels in .whl (monai, nibabel), found $count" >&2
    exit 1
fi
