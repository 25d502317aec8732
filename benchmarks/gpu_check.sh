#!/usr/bin/env bash
# The one command for an offline single-GPU (H100/H200-class) machine:
#
#     bash benchmarks/gpu_check.sh [gpu_check.py args]      # results in $OUT (./gpu_check_out)
#
# The machine has no network. If its Python lacks the project's dependencies, carry them as
# wheels in ./wheels, prepared on a networked machine with the same Python version / platform:
#
#     pip download --no-deps -d wheels diffusers==0.42.1 open_clip_torch==3.3.0 lpips==0.1.4 \
#         ftfy regex wcwidth safetensors huggingface_hub accelerate transformers tokenizers \
#         peft timm
#
# (torch and torchvision are expected to be preinstalled with CUDA on the GPU machine; add any
# other package the install step reports as missing). Steps: install ./wheels offline if the
# folder exists, install this repository without dependencies, run the check under a timeout
# (GPU_CHECK_TIMEOUT seconds, default 570 so a 10-minute slot still returns the results).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -d wheels ]; then
    "$PY" -m pip install --no-index --find-links wheels/ --no-deps wheels/*.whl || \
        echo "gpu_check.sh: installing ./wheels failed; continuing with what is installed" >&2
fi
"$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null || \
    echo "gpu_check.sh: 'pip install -e .' failed; using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/gpu_check_out}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-570}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit $rc
