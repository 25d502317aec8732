#!/usr/bin/env bash
# The one command for an offline single-GPU (H100/H200-class) machine:
#
#     bash benchmarks/gpu_check.sh [gpu_check.py args]      # results in $OUT (./gpu_check_out)
#     bash benchmarks/gpu_check.sh --install-only           # only the install steps below
#
# The machine has no network. If its Python lacks the project's dependencies, carry them as
# wheels in ./wheels, prepared on a networked machine for the GPU machine's Python version:
#
#     bash benchmarks/gpu_prepare.sh 3.12    # ./wheels (the set that ran on 2026-11-28), ./gpu_fmnist
#
# DeepSpeed (for the zero2_launch stage; without it that stage is skipped and says so) is on
# PyPI only as a source archive (deepspeed-0.19.8.tar.gz): this script builds it offline
# against the installed torch (pip --no-build-isolation, DS_BUILD_OPS=0: no CUDA compiler
# needed, DeepSpeed's kernels are JIT-built only when used, and ZeRO-2 with the trainers'
# torch AdamW uses none); that took 28 s with the other installs on an H200 machine.
# Fashion-MNIST (the training stages' data): DIFFDISTILL_FMNIST, else ./gpu_fmnist when the
# machine lacks Debian's package.
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
# diffdistill.trainers / .eval exist only through the install (pyproject's package-dir).
"$PY" -m pip install --no-deps --no-build-isolation -e . >/dev/null || {
    echo "gpu_check.sh: 'pip install -e .' failed (needs setuptools>=77: see gpu_prepare.sh)" >&2
    exit 1
}
# `--install-only`: stop here, so that other jobs (a bench) can run before the check.
[ "${1:-}" = "--install-only" ] && exit 0
export OUT="${OUT:-$PWD/gpu_check_out}"
if [ -z "${DIFFDISTILL_FMNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d gpu_fmnist ]; then
    export DIFFDISTILL_FMNIST="$PWD/gpu_fmnist"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-570}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit $rc
