# Sourced by gpu_smoke.sh and gpu_suite.sh: sets $python (default python3, or $PYTHON) and, on a machine
# without monai/nibabel (e.g. the lent device machine, which has no package registry), installs the wheels
# carried in .whl/ (benchmarks/fetch_wheels.sh) into /tmp/site and puts it on PYTHONPATH (see docs/gpus.md).
# Stops with a message naming what is missing when pip fails or a needed module still does not import.
python="${PYTHON:-python3}"
_imports="torch, numpy, scipy, yaml, tqdm, PIL, einops, tensorboard, monai, nibabel"
if ! "$python" -c "import monai, nibabel" 2>/dev/null && [ -d .whl ]; then
    if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        echo "error: pip could not install the wheels in .whl/; run benchmarks/fetch_wheels.sh where PyPI is reachable" >&2
        exit 2
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import $_imports" 2>/tmp/_python_imports.err; then
    echo "error: $(tail -n 1 /tmp/_python_imports.err) (needed: $_imports); carry the wheels: benchmarks/fetch_wheels.sh" >&2
    exit 2
fi
