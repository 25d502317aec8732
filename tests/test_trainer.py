"""The Trainer base through its first user, the pretraining trainer (tiny models, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.base import NonFiniteLossError
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.pretrain import PretrainConfig, PretrainTrainer
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]


def pixel_cfg(model_dir, out, **train):
    return build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(out), "seed": 1,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 16, "limit": 64},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 3,
                  "cpu": True, **train},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    ck = list_checkpoints(out)[-1]
    return load_file(str(ck / "model.safetensors"))


def test_resume_is_bit_identical(pixel_dir, tmp_path):
    a = tmp_path / "a"
    PretrainTrainer(pixel_cfg(pixel_dir, a, ema_decay=0.9)).fit()
    b = tmp_path / "b"
    PretrainTrainer(pixel_cfg(pixel_dir, b, ema_decay=0.9, max_steps=3)).fit()
    assert [p.name for p in list_checkpoints(b)] == ["checkpoint-3"]
    PretrainTrainer(pixel_cfg(pixel_dir, b, ema_decay=0.9)).fit(resume="latest")
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [m["loss"] for m in metrics(a)]
    lb = [m["loss"] for m in metrics(b)]
    assert lb == la  # steps 1-3 from the first part, 4-6 after the resume
    ea = load_file(str(list_checkpoints(a)[-1] / "trainer_tensors.safetensors"))
    eb = load_file(str(list_checkpoints(b)[-1] / "trainer_tensors.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # EMA resumed too
    # keep_checkpoints=2 and no temporary folders left behind
    assert [p.name for p in list_checkpoints(a)] == ["checkpoint-3", "checkpoint-6"]
    assert not [p for p in (a / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resume_rejects_other_config(pixel_dir, tmp_path):
    out = tmp_path / "r"
    PretrainTrainer(pixel_cfg(pixel_dir, out, max_steps=3)).fit()
    cfg = pixel_cfg(pixel_dir, out, max_steps=6)
    cfg.model.path = str(tmp_path / "elsewhere")
    t = PretrainTrainer(cfg)
    with pytest.raises(ConfigError, match="model.path"):
        t._check_compatible(json.loads((list_checkpoints(out)[-1] / "trainer_state.json")
                                       .read_text()), out)


def test_loss_decreases_on_fixed_batch(pixel_dir, tmp_path):
    t = PretrainTrainer(pixel_cfg(pixel_dir, tmp_path / "l", lr=3e-3))
    t.setup()
    batch = next(t._batches())
    t.generator.manual_seed(123)
    before = [t.train_step(batch)["loss"].item() for _ in range(3)]
    for _ in range(25):
        t.train_step(batch)
    t.generator.manual_seed(123)
    after = [t.train_step(batch)["loss"].item() for _ in range(3)]
    assert sum(after) < 0.7 * sum(before), (before, after)


def test_nonfinite_loss_skips_then_stops_naming_checkpoint(pixel_dir, tmp_path):
    cfg = pixel_cfg(pixel_dir, tmp_path / "nan", max_steps=20, max_nonfinite_steps=3,
                    checkpoint_every=2)

    class Poisoned(PretrainTrainer):
        def train_step(self, batch):
            if self.global_step >= 2:
                before = [p.detach().clone() for p in self.trainable["unet"]]
                self.step("unet", torch.tensor(float("nan"), requires_grad=True) * 1.0)
                assert all(torch.equal(a, p) for a, p in zip(before, self.trainable["unet"]))
                return {"loss": torch.tensor(float("nan"))}
            return super().train_step(batch)

    with pytest.raises(NonFiniteLossError, match="checkpoint-2"):
        Poisoned(cfg).fit()
    rows = metrics(tmp_path / "nan")
    assert rows[-1]["nonfinite_total"] == 2 and rows[-1]["loss"] is None


def test_export_loads_in_stock_diffusers(pixel_dir, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "e"
    PretrainTrainer(pixel_cfg(pixel_dir, out, max_steps=2, checkpoint_every=2)).fit()
    pipe = DiffusionPipeline.from_pretrained(str(out / "export"))
    assert type(pipe).__name__ == "DDPMPipeline"
    assert (out / "export" / "README.md").exists()
    # Stock DDPMPipeline.__call__ has no class_labels argument, so drive its own UNet and
    # scheduler by hand, the way a user samples a class-conditional pixel teacher.
    unet, sched = pipe.unet, pipe.scheduler
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t, class_labels=torch.tensor([1, 7])).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
    assert torch.isfinite(x).all() and float(x.std()) > 0
    # the exported UNet is the trained one (the newest checkpoint's weights)
    trained = final_weights(out)
    assert len(trained) > 10
    assert all(torch.equal(trained[k], unet.state_dict()[k]) for k in trained)


def test_latent_pretrain_step_and_export(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sd"
    cfg = build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(out), "model": {"path": str(sd_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 32, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "cpu": True},
        "log": {"every": 1, "progress": False, "tensorboard": False, "grid_every": 2,
                "grid_size": 4},
    })
    PretrainTrainer(cfg).fit()
    assert (out / "samples" / "step-0000002.png").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "export"))
    img = pipe("a photo of a bag", num_inference_steps=2, height=32, width=32,
               output_type="np").images
    assert img.shape == (1, 32, 32, 3) and float(img.std()) > 0


@pytest.mark.slow
def test_two_process_run(pixel_dir, tmp_path):
    """2 CPU ranks through accelerate: world_size 2 inside, identical params, one checkpoint."""
    from helpers import free_port

    out = tmp_path / "ddp"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        f"method: pretrain\noutput_dir: {out}\nseed: 1\nmodel: {{path: {pixel_dir}}}\n"
        "data: {kind: fashion_mnist, resolution: 16, limit: 64}\n"
        "train: {max_steps: 4, batch_size: 4, checkpoint_every: 2, cpu: true}\n"
        "log: {every: 1, progress: false, tensorboard: false}\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accel = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accel), "launch", "--config_file",
                        str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                        str(free_port()), "-m", "diffdistill.train", str(cfg_file), "--resume", "latest"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert {row["world_size"] for row in rows} == {2}
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # logged once, by rank 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    ck = list_checkpoints(out)[-1]
    assert sorted(p.name for p in ck.glob("trainer_rng_*")) == [
        "trainer_rng_0.safetensors", "trainer_rng_1.safetensors"]
    assert (out / "export" / "model_index.json").exists()


def test_latent_cache_encodes_each_image_once(sd_dir, tmp_path):
    """data.cache_dir: VAE posteriors cached on disk; sampled with the trainer generator."""
    def cfg(out, steps):
        return build_config(PretrainConfig, {
            "method": "pretrain", "output_dir": str(out), "model": {"path": str(sd_dir)},
            "data": {"kind": "fashion_mnist", "resolution": 32, "limit": 8,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "cpu": True},
            "log": {"every": 1, "progress": False, "tensorboard": False},
        })

    t = PretrainTrainer(cfg(tmp_path / "a", 4))
    t.setup()
    assert t.latent_cache is not None  # its namespace costs one probe encode, counted apart
    calls = []
    orig = t.backbone.encode_moments
    t.backbone.encode_moments = lambda pix, *a, **k: calls.append(len(pix)) or orig(pix)
    batches = t._batches()
    for _ in range(4):  # 2 epochs of 8 images
        t.encode_x0(next(batches))
    assert sum(calls) == 8  # second epoch fully served from the cache
    # the cached posterior reproduces the direct encoder's mean exactly
    b = next(batches)
    direct = t.backbone.encode_images(b["pixel_values"], sample=False)
    cached = torch.stack(t.latent_cache.cached_map(t._latent_keys(b), None))
    assert torch.allclose(t.backbone.latents_from_moments(cached, sample=False), direct,
                          atol=1e-6)
    with pytest.raises(ConfigError, match="random_flip"):
        build_config(PretrainConfig, {"data": {"cache_dir": "x", "random_flip": True}})
    with pytest.raises(ConfigError, match="data.center_crop=false"):
        build_config(PretrainConfig, {"data": {"kind": "imagefolder", "path": "x",
                                               "cache_dir": "x", "center_crop": False}})
    # webdataset samples are cached under their unique <shard>/<key>, not the in-shard index
    from diffdistill.trainers.common import BackboneMixin

    wds = {"index": torch.tensor([3, 3]), "key": ["a.tar/0003", "b.tar/0003"]}
    assert BackboneMixin._latent_keys(None, wds) == ["a.tar/0003", "b.tar/0003"]
    assert BackboneMixin._latent_keys(None, {"index": torch.tensor([3, 5])}) == ["3", "5"]


@pytest.mark.parametrize("method", ["lcd", "dmd2", "fdistill", "hypersd", "ict"])
def test_eval_guidance_scale_is_refused_by_students(method, tmp_path):
    """Only pretraining samples its periodic eval with eval.guidance_scale; a student is
    evaluated as exported, so the key would be silently ignored: refused by name instead."""
    from diffdistill.trainers import get_trainer_class

    cls = get_trainer_class(method)
    cfg = build_config(cls.config_class, {"method": method, "output_dir": str(tmp_path),
                                          "eval": {"guidance_scale": 2.0}})
    with pytest.raises(ConfigError, match="eval.guidance_scale=2.0"):
        cls(cfg)
    assert get_trainer_class("pretrain").eval_uses_guidance


class _Fixed(torch.nn.Module):
    """A 'network' that outputs a fixed tensor whatever its input (the denoiser's raw call)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.out + 0 * self.w)


@pytest.mark.parametrize("t", [3, 250, 999])
def test_min_snr_weight_is_the_same_x0_space_weight_for_every_target(t):
    """Min-SNR-γ (Hang et al. 2023, Eq. 6 and its v / x0 forms): whatever the network is
    trained to output, weight x ‖output − target‖² = min(SNR, γ) x ‖x0̂ − x0‖², with x0̂ the
    denoiser's own conversion — so the pixel teacher's switch from ε to v (its ε form has
    x0̂ error ×1/α ≈ 160 at t = 999, configs/pretrain/toy_pixel.yaml) keeps the loss balance
    over t. SNR by hand from the linear β of the DDPM config."""
    from diffdistill.trainers.pretrain import min_snr_weight

    from diffdistill.denoiser import Denoiser
    from diffdistill.schedule import schedule_from_scheduler_config

    config = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4,
              "beta_end": 0.02, "num_train_timesteps": 1000}
    sched = schedule_from_scheduler_config(config)
    # as DDPMScheduler: float32 betas and cumulative product
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    snr = float(alpha_bar[t].double() / (1 - alpha_bar[t].double()))
    gamma = 5.0
    g = torch.Generator().manual_seed(t)
    x0, noise, out = (torch.randn(1, 3, 4, 4, generator=g) for _ in range(3))
    tt = torch.tensor([float(t)])
    xt = sched.add_noise(x0, noise, tt)
    for kind in ("epsilon", "v_prediction", "sample"):
        den = Denoiser(_Fixed(out), sched, prediction_type=kind)
        weight = float(min_snr_weight(sched, tt, gamma, kind))
        expected = {"epsilon": min(snr, gamma) / snr, "v_prediction": min(snr, gamma) / (snr + 1),
                    "sample": min(snr, gamma)}[kind]
        assert weight == pytest.approx(expected, rel=1e-5), kind
        loss = weight * float(((out - den.target(x0, noise, tt)) ** 2).sum())
        x0_err = float(((den(xt, tt).x0.detach() - x0) ** 2).sum())
        assert loss == pytest.approx(min(snr, gamma) * x0_err, rel=1e-4), kind


def test_pretrain_target_retrains_an_eps_folder_as_v_prediction(pixel_dir, tmp_path):
    """``pretrain.target: v_prediction`` on an ε folder: the trainer fits v = α ε − σ x0 and
    the export's scheduler says v_prediction, so stock diffusers and the toolkit read the
    trained network the same way."""
    from diffusers import DDPMScheduler

    from diffdistill.backbone import load_backbone

    out = tmp_path / "v"
    cfg = pixel_cfg(pixel_dir, out, max_steps=2)
    cfg.pretrain.target = "v_prediction"
    trainer = PretrainTrainer(cfg)
    trainer.fit()
    assert load_backbone(pixel_dir).prediction_type == "epsilon"
    assert trainer.backbone.prediction_type == "v_prediction"
    assert DDPMScheduler.from_pretrained(str(out / "export"), subfolder="scheduler").config[
        "prediction_type"] == "v_prediction"
    assert load_backbone(out / "export").prediction_type == "v_prediction"


def test_latent_cache_namespace_follows_the_vae_weights(sd_dir, tmp_path):
    """The latent cache is keyed by what the VAE computes, not by the model's path: the same
    VAE at another path shares it, a VAE replaced in place at the same path does not."""
    import shutil

    from safetensors.torch import save_file

    def namespace(model_dir, out):
        t = PretrainTrainer(build_config(PretrainConfig, {
            "method": "pretrain", "output_dir": str(tmp_path / out),
            "model": {"path": str(model_dir)},
            "data": {"kind": "fashion_mnist", "resolution": 32, "limit": 8,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": 1, "batch_size": 4, "cpu": True},
            "log": {"progress": False, "tensorboard": False}}))
        t.setup()
        return t.latent_cache.directory.name

    a, b = tmp_path / "model_a", tmp_path / "model_b"
    shutil.copytree(sd_dir, a)
    shutil.copytree(sd_dir, b)
    first = namespace(a, "o1")
    assert first.startswith("vae-") and namespace(b, "o2") == first
    (weights,) = (b / "vae").glob("*.safetensors")
    w = load_file(str(weights))
    key = next(k for k in w if k.startswith("encoder.") and k.endswith(".weight"))
    w[key] = w[key] * 1.01
    save_file(w, str(weights))
    assert namespace(b, "o3") != first


def test_warmed_up_decay_is_the_diffusers_emamodel_warmup():
    from diffdistill.trainers.ema import warmed_up_decay

    # (1 + s) / (10 + s) at s = step - 1, capped at the configured decay
    assert warmed_up_decay(0.999, 1) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 9) == pytest.approx(0.5)
    assert warmed_up_decay(0.999, 891) == pytest.approx(0.99)
    assert warmed_up_decay(0.99, 5000) == 0.99
    with pytest.raises(ValueError, match="from 1"):
        warmed_up_decay(0.9, 0)


def test_ema_warmup_follows_the_step_counter(pixel_dir, tmp_path):
    """train.ema_warmup: the n-th update uses decay n/(n+9): after two steps the EMA is
    (2/11)·ema_1 + (9/11)·θ_2, and ema_1 = 0.1·θ_0 + 0.9·θ_1 (θ_0: the folder's weights)."""
    from diffusers import UNet2DModel

    out = tmp_path / "w"
    PretrainTrainer(pixel_cfg(pixel_dir, out, ema_decay=0.999, ema_warmup=True, max_steps=2,
                              checkpoint_every=1)).fit()
    c1, c2 = list_checkpoints(out)
    theta = [load_file(str(c / "model.safetensors")) for c in (c1, c2)]
    ema = [load_file(str(c / "trainer_tensors.safetensors")) for c in (c1, c2)]
    theta0 = UNet2DModel.from_pretrained(pixel_dir, subfolder="unet").state_dict()
    names = [k[len("ema.unet."):] for k in ema[0] if k.startswith("ema.unet.")]
    assert len(names) > 10
    for n in names:
        w1, w2 = theta[0][n], theta[1][n]
        e1, e2 = ema[0][f"ema.unet.{n}"], ema[1][f"ema.unet.{n}"]
        torch.testing.assert_close(e1, 0.1 * theta0[n] + 0.9 * w1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e2, (2 / 11) * e1 + (9 / 11) * w2, rtol=1e-5, atol=1e-6)
