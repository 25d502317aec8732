#!/usr/bin/env bash
# The one command for an offline single-GPU (H100/H200-class) machine:
#
#     bash benchmarks/gpu_check.sh [gpu_check.py args]      # results in $OUT (./gpu_check_out)
#     bash benchmarks/gpu_check.sh --install-only           # only the install steps below
#
# The machine has no network. If its Python lacks the project's dependencies, carry them as
# wheels in ./wheels, prepared on a networked machine with the same Python version / platform:
#
#     pip download --no-deps -d wheels diffusers==0.42.1 open_clip_torch==3.3.0 lpips==0.1.4 \
#         ftfy regex wcwidth safetensors huggingface_hub accelerate transformers tokenizers \
#         peft timm \
#         deepspeed==0.19.8 einops hjson msgpack ninja py-cpuinfo nvidia-ml-py
#
# The last line is for the zero2_launch stage (configs/accelerate/deepspeed_zero2.yaml);
# without deepspeed that stage is skipped and says so. PyPI has deepspeed only as a source
# archive (deepspeed-0.19.8.tar.gz): this script builds it offline against the installed
# torch (pip --no-build-isolation, DS_BUILD_OPS=0: no CUDA compiler needed, DeepSpeed's
# kernels are JIT-built only when used, and ZeRO-2 with the trainers' torch AdamW uses none).
# That needs setuptools in the GPU machine's Python; alternatively build the wheel on a
# machine with torch: `pip wheel --no-deps -w wheels deepspeed==0.19.8` (a py3-none-any
# wheel). deepspeed also imports numpy, packaging, psutil and tqdm (accelerate's own
# dependencies) and pydantic>=2: add `pydantic pydantic-core annotated-types
# typing-inspection` to the download if the GPU machine's Python lacks it.
#
# (torch and torchvision are expected to be preinstalled with CUDA on the GPU machine; add any
# other package the install step reports as missing). Steps: install ./wheels offline if the
# folder exists, install this repository without dependencies, run the check under a timeout
# (GPU_CHECK_TIMEOUT seconds, default 570 so a 10-minute slot still returns the results).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -d wheels ]; then
    shopt -s nullglob
    whl=(wheels/*.whl)
    sdists=(wheels/*.tar.gz)  # source-only packages (deepspeed): built offline
    shopt -u nullglob
    if [ ${#whl[@]} -gt 0 ]; then
        "$PY" -m pip install --no-index --find-links wheels/ --no-deps "${whl[@]}" || \
            echo "gpu_check.sh: installing ./wheels failed; continuing with what is installed" >&2
    fi
    for sdist in ${sdists[@]+"${sdists[@]}"}; do
        DS_BUILD_OPS=0 "$PY" -m pip install --no-index --find-links wheels/ --no-deps \
            --no-build-isolation "$sdist" || \
            echo "gpu_check.sh: building $sdist failed; its stage will say what is missing" >&2
    done
fi
"$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null || \
    echo "gpu_check.sh: 'pip install -e .' failed; using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# `--install-only`: stop here, so that other jobs (a bench) can run before the check.
[ "${1:-}" = "--install-only" ] && exit 0
export OUT="${OUT:-$PWD/gpu_check_out}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-570}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit $rc
