"""The `diffdistill` command end to end on tiny models: train, export, sample, help, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffdistill.cli import build_parser, main


def write_cfg(tmp_path, model_dir, out, steps=2, extra=""):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"method: pretrain\noutput_dir: {out}\nmodel: {{path: {model_dir}}}\n"
        "data: {kind: fashion_mnist, resolution: 16, limit: 32}\n"
        f"train: {{max_steps: {steps}, batch_size: 4, checkpoint_every: 2, cpu: true}}\n"
        "log: {every: 1, progress: false, tensorboard: false}\n" + extra)
    return cfg


def test_help_lists_every_command_and_the_config_contract():
    text = build_parser().format_help()
    for cmd in ("train", "sample", "export", "demo"):
        assert cmd in text
    sub = subprocess.run([sys.executable, "-m", "diffdistill.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0
    for key in ("train.lr", "adapter.type", "model.path", "accelerate launch"):
        assert key in sub.stdout


def test_train_export_sample_round_trip(pixel_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, pixel_dir, out)
    assert main(["train", str(cfg), "train.lr=5e-4"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.0005" in saved  # the resolved config, with the override, is in the run dir
    # re-export from the newest checkpoint into another folder
    assert main(["export", str(out), "--out", str(tmp_path / "re")]) == 0
    a = (out / "export" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "re" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    png = tmp_path / "s.png"
    assert main(["sample", str(out / "export"), "--class-label", "3", "--class-label", "7",
                 "--num", "2", "--steps", "3", "--sampler", "ddim", "--out", str(png)]) == 0
    img = np.asarray(Image.open(png))
    assert img.shape[2] == 3 and img.std() > 0
    # same seeds → the same grid
    png2 = tmp_path / "s2.png"
    main(["sample", str(out / "export"), "--class-label", "3", "--class-label", "7",
          "--num", "2", "--steps", "3", "--sampler", "ddim", "--out", str(png2)])
    assert np.array_equal(img, np.asarray(Image.open(png2)))


def test_sample_text_model(sd_dir, tmp_path):
    png = tmp_path / "t.png"
    assert main(["sample", str(sd_dir), "--prompt", "a photo of a bag", "--num", "2",
                 "--steps", "2", "--sampler", "ddim", "--guidance-scale", "2",
                 "--out", str(png)]) == 0
    assert np.asarray(Image.open(png)).std() > 0


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lrr"),
    ("adapter.type=dora", "adapter.type"),
    ("train.batch_size=0", "train.batch_size"),
])
def test_bad_config_exits_2_naming_key(pixel_dir, tmp_path, capsys, override, needle):
    cfg = write_cfg(tmp_path, pixel_dir, tmp_path / "x")
    assert main(["train", str(cfg), override]) == 2
    assert needle in capsys.readouterr().err


def test_missing_model_folder_and_hub_id(tmp_path, capsys):
    cfg = write_cfg(tmp_path, tmp_path / "missing", tmp_path / "y")
    assert main(["train", str(cfg)]) == 2
    assert "missing" in capsys.readouterr().err
    cfg = write_cfg(tmp_path, "runwayml/stable-diffusion-v1-5", tmp_path / "z")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "download" in err and "local" in err.lower()


def test_export_without_checkpoint_is_an_error(pixel_dir, tmp_path, capsys):
    out = tmp_path / "nock"
    cfg = write_cfg(tmp_path, pixel_dir, out, extra="")
    main(["train", str(cfg), "train.checkpoint_every=0"])
    assert main(["export", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    meta = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta["step"] == 2


def test_transcript_is_quiet_unless_verbose(tmp_path):
    """The libraries' load bars ("Loading weights", diffusers' component bar) stay off in the
    CLI's transcript; -v brings them back; the toolkit's own generation bar always shows."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                        "DIFFUSERS_VERBOSITY", "DIFFDISTILL_QUIET")}

    def run(*flags):
        cmd = [sys.executable, "-m", "diffdistill.cli", *flags, "sample", "world:teacher_latent",
               "--steps", "1", "--num", "1", "--prompt", "a photo of a bag",
               "--out", str(tmp_path / "s.png")]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    quiet, verbose = run(), run("-v")
    assert "generate (ddim, 1 steps)" in quiet and "Loading weights" not in quiet
    assert "Loading weights" in verbose
