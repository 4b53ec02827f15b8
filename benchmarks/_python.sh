# Sourced by gpu_smoke.sh and gpu_suite.sh: sets $python (default python3, or $PYTHON) and, on a machine
# without monai/nibabel (e.g. the lent device machine, which has no package registry), installs the wheels
# carried in .whl/ into /tmp/site and puts it on PYTHONPATH (see docs/gpus.md).
python="${PYTHON:-python3}"
if ! "$python" -c "import monai, nibabel" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
