"""f-distill: h(r) against its formulas, rkl ≡ DMD2 bit for bit, the timestep-bin statistics,
two processes agreeing on them, one-step runs on each structure, and exports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.dmd2 import DMD2Trainer
from diffdistill.trainers.fdistill import (
    FDistillConfig,
    FDistillTrainer,
    bin_sums,
    normalise_mean_one,
    timestep_bins,
    update_bin_means,
)
from helpers import free_port, tiny_run_data  # noqa: E402
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config, deep_merge

ROOT = Path(__file__).resolve().parents[1]


def fd_data(model_dir, out, res, method="fdistill", **over):
    data = tiny_run_data(method, model_dir, out, res,
                         dmd2={"fake_updates_per_generator_update": 2})
    return deep_merge(data, over)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- h(r)

R = torch.tensor([0.5, 1.0, 2.0, 7.0])
FORMULAS = {
    "rkl": lambda r: [1.0 for _ in r],
    "kl": lambda r: list(r),
    "js": lambda r: [x / (1 + x) for x in r],
    "srkl": lambda r: [1 / (1 + x) for x in r],
    "sh": lambda r: [math.sqrt(x) for x in r],
    "jeffreys": lambda r: [1 + x for x in r],
    "neyman": lambda r: [1 / x for x in r],
}


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """An f-distill trainer with only what dm_weight needs (no networks)."""
    out = tmp_path_factory.mktemp("bare")
    tr = FDistillTrainer(build_config(FDistillConfig, fd_data("unused", out, 16)))
    tr.T = 1000
    return tr


def _fresh_stats(tr, bins=10):
    tr.state_tensors[tr.MEAN_KEY] = torch.ones(bins, dtype=torch.float64)
    tr.state_tensors[tr.COUNT_KEY] = torch.zeros(bins, dtype=torch.float64)


@pytest.mark.parametrize("name", list(FORMULAS))
def test_each_weight_follows_its_formula(name, bare):
    f = bare.cfg.fdistill
    f.divergence, f.normalize_ratio, f.normalize_weight = name, False, False
    h = bare.dm_weight(None, torch.tensor([100.0, 200.0, 300.0, 400.0]), R.log())
    assert torch.allclose(h, torch.tensor(FORMULAS[name](R.tolist())), rtol=1e-6)
    # the logit and r clamps: |logit| <= 10, then r in [0.1, 20]
    h = bare.dm_weight(None, torch.tensor([1.0, 2.0, 3.0, 4.0]),
                       torch.tensor([15.0, -15.0, math.log(0.05), 2.0]))
    r = torch.tensor([20.0, 0.1, 0.1, math.exp(2.0)])
    assert torch.allclose(h, torch.tensor(FORMULAS[name](r.tolist())), rtol=1e-6)


def test_rkl_weight_is_exactly_one(bare):
    f = bare.cfg.fdistill
    f.divergence, f.normalize_ratio, f.normalize_weight = "rkl", True, True
    _fresh_stats(bare)
    h = bare.dm_weight(None, torch.tensor([10.0, 500.0, 990.0]), torch.tensor([3.0, -2.0, 0.1]))
    assert torch.equal(h, torch.ones(3))


# ----------------------------------------------------------------------------- statistics


def test_timestep_bins_and_running_means_by_hand():
    t = torch.tensor([0.0, 99.0, 100.0, 999.0, 550.0, 560.0])
    bins = timestep_bins(t, 10, 1000)
    assert bins.tolist() == [0, 0, 1, 9, 5, 5]
    r = torch.tensor([1.0, 3.0, 4.0, 0.5, 2.0, 6.0])
    s, c = bin_sums(bins, r, 10)
    assert s.tolist() == [4.0, 4.0, 0, 0, 0, 8.0, 0, 0, 0, 0.5]
    assert c.tolist() == [2.0, 1.0, 0, 0, 0, 2.0, 0, 0, 0, 1.0]
    mean, count = torch.ones(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    mean, count = update_bin_means(mean, count, s, c, ema=0.9)
    # first batch of a bin sets its mean; empty bins keep 1 and count 0
    assert mean.tolist() == [2.0, 4.0, 1, 1, 1, 4.0, 1, 1, 1, 0.5]
    assert count.tolist() == [2.0, 1.0, 0, 0, 0, 2.0, 0, 0, 0, 1.0]
    s2, c2 = bin_sums(torch.tensor([0, 3]), torch.tensor([12.0, 5.0]), 10)
    mean, count = update_bin_means(mean, count, s2, c2, ema=0.9)
    assert mean[0] == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)  # EMA where seen before
    assert mean[3] == 5.0 and mean[1] == 4.0  # first sight / untouched
    assert count[0] == 3.0 and count[3] == 1.0
    h = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert normalise_mean_one(h, h.sum().double(), torch.tensor(4.0)).mean() == pytest.approx(1)


def test_dm_weight_normalises_r_by_its_bin_and_h_to_mean_one(bare):
    f = bare.cfg.fdistill
    f.divergence, f.normalize_ratio, f.normalize_weight, f.ratio_ema = "kl", True, True, 0.5
    _fresh_stats(bare)
    t = torch.tensor([10.0, 20.0, 510.0, 990.0])
    r = torch.tensor([2.0, 4.0, 5.0, 0.5])
    h = bare.dm_weight(None, t, r.log())
    # bin means after this batch: bin 0 -> 3, bin 5 -> 5, bin 9 -> 0.5; kl: h = r / mean
    h_raw = torch.tensor([2 / 3, 4 / 3, 1.0, 1.0])
    assert torch.allclose(h, h_raw / h_raw.mean(), rtol=1e-6)
    assert float(h.mean()) == pytest.approx(1.0, abs=1e-6)
    m = bare.state_tensors[bare.MEAN_KEY]
    assert [float(m[i]) for i in (0, 5, 9, 1)] == pytest.approx([3.0, 5.0, 0.5, 1.0])
    h = bare.dm_weight(None, torch.tensor([30.0, 40.0]), torch.tensor([5.0, 5.0]).log())
    assert float(bare.state_tensors[bare.MEAN_KEY][0]) == pytest.approx(0.5 * 3 + 0.5 * 5)
    assert torch.allclose(h, torch.ones(2))
    assert bare.state_tensors[bare.COUNT_KEY][0] == 4.0


# ----------------------------------------------------------------------------- vs DMD2


def test_reverse_kl_reproduces_dmd2_bit_for_bit(pixel_dir, tmp_path):
    over = dict(train={"max_steps": 3, "checkpoint_every": 3},
                dmd2={"fake_updates_per_generator_update": 2})
    DMD2Trainer(build_config(DMD2Trainer.config_class, fd_data(
        pixel_dir, tmp_path / "dmd2", 16, method="dmd2", **over))).fit()
    FDistillTrainer(build_config(FDistillConfig, fd_data(
        pixel_dir, tmp_path / "rkl", 16, fdistill={"divergence": "rkl", "r1_gamma": 0.0},
        **over))).fit()
    a, b = metrics(tmp_path / "dmd2"), metrics(tmp_path / "rkl")
    keys = ["loss_dm", "loss_gan_generator", "loss_fake", "loss_fake_denoise",
            "loss_gan_discriminator"]
    assert [r.get("loss_dm") for r in a] == [r.get("loss_dm") for r in b]
    for ra, rb in zip(a, b):
        assert all(ra.get(k) == rb.get(k) for k in keys), (ra, rb)
    assert sum("loss_dm" in r for r in a) == 2  # steps 0 and 2 update the generator
    ca, cb = list_checkpoints(tmp_path / "dmd2")[-1], list_checkpoints(tmp_path / "rkl")[-1]
    for f in ("model.safetensors", "model_1.safetensors"):
        wa, wb = load_file(str(ca / f)), load_file(str(cb / f))
        assert len(wa) > 10 and all(torch.equal(wa[k], wb[k]) for k in wa)
    m = load_file(str(cb / "trainer_tensors.safetensors"))
    assert m[FDistillTrainer.COUNT_KEY].sum() == 4  # 2 generator steps x batch 2, in the ckpt
    # with JS instead, the same seeds give a different generator. (Without the bin
    # normalisation: a bin's first sample defines its mean, so at batch 2 every r/mean is 1.)
    FDistillTrainer(build_config(FDistillConfig, fd_data(
        pixel_dir, tmp_path / "js", 16, fdistill={"divergence": "js", "normalize_ratio": False},
        **over))).fit()
    wj = load_file(str(list_checkpoints(tmp_path / "js")[-1] / "model.safetensors"))
    wa = load_file(str(ca / "model.safetensors"))
    assert any(not torch.equal(wa[k], wj[k]) for k in wa)


# ----------------------------------------------------------------------------- config


def test_ratio_is_read_at_the_x_t_it_weights(pixel_dir, tmp_path):
    """h(r)'s logits come from the very fake-score forward that gives the DM term's x0̂_fake:
    the x_t handed to dm_weight is the fake UNet's input in that pass, and its logits are the
    head's output there (not a second draw of t or noise)."""
    tr = FDistillTrainer(build_config(FDistillConfig, fd_data(pixel_dir, tmp_path, 16)))
    tr.setup()
    batch = next(tr._batches())
    cond = tr.cond_for_batch(batch, with_uncond=True)
    fake = tr.unwrap(tr.fake_score)
    seen_inputs, seen_logits, weighted = [], [], {}
    hook = fake.unet.register_forward_pre_hook(
        lambda m, args, kw: seen_inputs.append((args[0] if args else kw["sample"]).detach()),
        with_kwargs=True)
    fake.head.register_forward_hook(lambda m, a, out: seen_logits.append(out.detach()))
    weight = tr.dm_weight

    def spy(x_t, t, logits):
        weighted.update(x_t=x_t.clone(), logits=logits.clone())
        return weight(x_t, t, logits)

    tr.dm.weight_fn = spy
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    tr.distribution_matching_loss(x, cond)
    hook.remove()
    assert len(seen_inputs) == 1 and len(seen_logits) == 1  # one fake-score pass in the DM
    assert torch.equal(weighted["x_t"], seen_inputs[0].float())
    assert torch.equal(weighted["logits"], seen_logits[0])


def test_config_without_gan_is_rejected(tmp_path):
    for w in ({"gan_generator_weight": 0.0}, {"gan_discriminator_weight": 0.0,
                                              "gan_generator_weight": 0.0}):
        with pytest.raises(ConfigError, match="f-distill needs the GAN"):
            build_config(FDistillConfig, fd_data("x", tmp_path, 16, dmd2=w))
    with pytest.raises(ConfigError, match="fdistill.divergence"):
        build_config(FDistillConfig, fd_data("x", tmp_path, 16,
                                             fdistill={"divergence": "tv"}))


CONFIG_MODELS = {"toy": ("sd_dir", 32), "sd15": ("sd_dir", 32), "toy_pixel": ("pixel_dir", 16),
                 "imagenet64": ("pixel_dir", 16)}


@pytest.mark.parametrize("name", list(CONFIG_MODELS))
def test_config_one_step_on_a_tiny_model(name, request, tmp_path):
    from diffdistill.trainers import get_trainer_class

    from diffdistill.config import load_yaml

    fixture, res = CONFIG_MODELS[name]
    data = deep_merge(load_yaml(ROOT / "configs" / "fdistill" / f"{name}.yaml"), {
        "output_dir": str(tmp_path / name),
        "model": {"path": str(request.getfixturevalue(fixture)), "frozen_dtype": "fp32"},
        "data": {"kind": "fashion_mnist", "path": "", "resolution": res, "limit": 8},
        "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "cpu": True,
                  "mixed_precision": "no"},
        "log": {"progress": False, "tensorboard": False, "grid_every": 0},
    })
    cls = get_trainer_class(data["method"])
    assert cls is FDistillTrainer
    cfg = build_config(cls.config_class, data)
    logs = cls(cfg).fit()
    assert {"loss_dm", "loss_gan_generator", "ratio_mean", "h_min", "h_max"} <= set(logs)
    assert all(math.isfinite(v) for v in logs.values())
    if cfg.fdistill.r1_gamma > 0:  # toy and sd15 carry R1 (Table 5: gamma 1 for SD)
        assert logs["loss_d_penalty"] > 0
        # R1 belongs to the discriminator's loss: both carry its weight (1e-2)
        total = (logs["loss_fake_denoise"] + 1e-2 * (logs["loss_gan_discriminator"]
                                                     + logs["loss_d_penalty"]))
        assert logs["loss_fake"] == pytest.approx(total, rel=1e-5)


def test_one_step_sdxl_structure_and_export(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = build_config(FDistillConfig, fd_data(sdxl_dir, tmp_path / "xl", 32,
                                               train={"max_steps": 1},
                                               fdistill={"divergence": "kl", "r1_gamma": 1.0}))
    tr = FDistillTrainer(cfg)
    logs = tr.fit()
    assert logs["loss_d_penalty"] > 0 and math.isfinite(logs["loss_dm"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl" / "export"))
    prompts = ["a photo of a dress", "a photo of a coat"]
    cond = tr.backbone.encode_prompts(prompts, with_uncond=False)
    ours = tr.sample_latents([0, 1], cond)
    with torch.no_grad():
        stock = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                     output_type="latent").images
    err = float((stock - ours).abs().max() / ours.abs().max())
    assert err < 1e-4


def test_export_loads_in_stock_diffusers(sd_dir, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    cfg = build_config(FDistillConfig, fd_data(
        sd_dir, tmp_path / "lora", 32, train={"max_steps": 1},
        adapter={"type": "lora", "rank": 4}, dmd2={"timesteps": [399]}))
    tr = FDistillTrainer(cfg)
    tr.fit()
    export = tr.out / "export"
    readme = (export / "README.md").read_text()
    assert "fdistill" in readme and "timesteps=[399]" in readme  # not an LCM default grid
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a photo of a bag", "a photo of a shirt"]
    ours = tr.sample_latents([2, 3], tr.backbone.encode_prompts(prompts, with_uncond=False))
    with torch.no_grad():
        stock = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=1.0,
                     height=32, width=32, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in (2, 3)]).images
    assert float((stock - ours).abs().max() / ours.abs().max()) < 1e-4


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_processes_keep_the_bins_equal(pixel_dir, tmp_path):
    """2 CPU ranks see different data; the all-reduced bin statistics stay equal on both (the
    run's verify_replicas compares them and fails otherwise) and count both ranks' samples."""
    import yaml

    out = tmp_path / "ddp"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(fd_data(
        pixel_dir, out, 16, train={"max_steps": 2, "checkpoint_every": 2},
        dmd2={"fake_updates_per_generator_update": 1})))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accel = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accel), "launch", "--config_file",
                        str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                        str(free_port()), "-m", "diffdistill.train", str(cfg_file)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert {row["world_size"] for row in rows} == {2} and len(rows) == 2
    ck = list_checkpoints(out)[-1]
    st = load_file(str(ck / "trainer_tensors.safetensors"))
    # 2 generator steps x 2 samples x 2 ranks: each rank counted the other's samples too
    assert st[FDistillTrainer.COUNT_KEY].sum() == 8
    assert (out / "export" / "model_index.json").exists()
