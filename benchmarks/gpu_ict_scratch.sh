#!/usr/bin/env bash
# iCT from scratch at the paper's batch, on one offline GPU (target: one step <= 2x the
# world's pixel teacher, 1.32 at 50 steps / 1000 samples). On a 2-core CPU the same config
# runs batch 32 and plateaus at FID 16-25 (docs/one_step.md, "iCT from scratch"); the paper
# trains batch 1024 for 400k steps.
#
#     bash benchmarks/gpu_ict_scratch.sh          # results in $OUT (./gpu_ict_out)
#
# Knobs (environment): ICT_CONFIG (configs/ict/toy_scratch_wide.yaml), ICT_BATCH (1024),
# ICT_STEPS (6000), ICT_LR (2e-4), ICT_CURRICULUM (discrete | ect), ICT_TRAIN_TIMEOUT
# (seconds, 420), ICT_SAMPLES (bench samples, 1000), ICT_DEVICE_ARGS (extra overrides, e.g.
# train.cpu=true for a dry run here). The training data must be the full Fashion-MNIST
# training split: prepare it with `FMNIST_TRAIN_IMAGES=60000 bash benchmarks/gpu_prepare.sh`
# (./gpu_fmnist, 26 MB) or point DIFFDISTILL_FMNIST at a copy. Training stops at the timeout
# with its last periodic checkpoint exported, so a 10-minute slot still returns a bench.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
bash benchmarks/gpu_check.sh --install-only || exit 1
OUT="${OUT:-$PWD/gpu_ict_out}"
mkdir -p "$OUT"
if [ -z "${DIFFDISTILL_FMNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d gpu_fmnist ]; then
    export DIFFDISTILL_FMNIST="$PWD/gpu_fmnist"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run="$OUT/ict"
# shellcheck disable=SC2086  # ICT_DEVICE_ARGS is a list of overrides
timeout --signal=INT --kill-after=30 "${ICT_TRAIN_TIMEOUT:-420}" \
    "$PY" -m diffdistill.app.cli train "${ICT_CONFIG:-configs/ict/toy_scratch_wide.yaml}" \
    output_dir="$run" train.batch_size="${ICT_BATCH:-1024}" train.max_steps="${ICT_STEPS:-6000}" \
    train.lr="${ICT_LR:-2e-4}" ict.curriculum="${ICT_CURRICULUM:-discrete}" \
    train.checkpoint_every=500 train.keep_checkpoints=1 eval.every=1000 eval.num_samples=1000 \
    'eval.steps=[1,2]' log.tensorboard=false log.progress=false ${ICT_DEVICE_ARGS:-}
echo "gpu_ict_scratch.sh: training exited with $?" >&2
if [ ! -d "$run/export" ]; then  # stopped before the end: export the last checkpoint
    "$PY" -m diffdistill.app.cli export "$run" --out "$run/export" || exit 1
fi
"$PY" -m diffdistill.app.cli bench configs/bench/world_ict_scratch.yaml models.0.path="$run/export" \
    "models.0.name=iCT (scratch, GPU batch ${ICT_BATCH:-1024})" num_samples="${ICT_SAMPLES:-1000}" \
    out="$OUT/bench"
