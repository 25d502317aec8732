"""A training process killed with SIGKILL resumes with `--resume latest` and ends
bit-identical to an uninterrupted run; a half-written checkpoint is never "latest"."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffdistill.trainers.base import list_checkpoints


def _cfg(tmp_path, model_dir, out, name):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"method: pretrain\noutput_dir: {out}\nseed: 3\nmodel: {{path: {model_dir}}}\n"
        "data: {kind: fashion_mnist, resolution: 16, limit: 64}\n"
        "train: {max_steps: 12, batch_size: 4, lr: 1.0e-3, checkpoint_every: 1, "
        "keep_checkpoints: 3, ema_decay: 0.9, cpu: true}\n"
        "log: {every: 1, progress: false, tensorboard: false}\n")
    return cfg


def _train(cfg, *extra):
    return [sys.executable, "-m", "diffdistill.cli", "train", str(cfg), *extra]


def _losses(out):
    by_step = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            by_step[row["step"]] = row["loss"]  # a step redone after the crash: last wins
    return by_step


def test_sigkill_then_resume_latest_is_bit_identical(pixel_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_train(_cfg(tmp_path, pixel_dir, ref, "ref")), check=True, env=env,
                   capture_output=True, timeout=600)

    out = tmp_path / "crash"
    cfg = _cfg(tmp_path, pixel_dir, out, "crash")
    proc = subprocess.Popen(_train(cfg), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill somewhere after the 4th checkpoint
        ck = list_checkpoints(out)
        if ck and int(ck[-1].name.split("-")[1]) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert killed_at < 12, "the run finished before it could be killed; slow it down"
    # a crash in the middle of a checkpoint write leaves only a temporary folder behind
    half = out / "checkpoints" / f".tmp-checkpoint-{killed_at + 1}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"truncated")
    assert list_checkpoints(out)[-1].name == f"checkpoint-{killed_at}"

    subprocess.run(_train(cfg, "--resume", "latest"), check=True, env=env,
                   capture_output=True, timeout=600)
    final_ref, final = list_checkpoints(ref)[-1], list_checkpoints(out)[-1]
    assert final_ref.name == final.name == "checkpoint-12"
    for fname in ("model.safetensors", "trainer_tensors.safetensors"):
        a, b = load_file(str(final_ref / fname)), load_file(str(final / fname))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fname
    assert _losses(out) == _losses(ref)
    assert not half.exists()  # the next save of that step replaced the leftover
