"""rCM (Zheng et al. 2025: sCD + distribution matching): the DM term is DMD2's on the same x,
t and noise; the student's loss is sCM's plus λ·L_DM on its own sample (by hand); the update
schedule; one-line refusals; SIGKILL + resume bit-identical; a LoRA export in the teacher's
stock pipeline; the shipped configs — tiny models on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.rcm import RCMConfig, RCMTrainer
from diffdistill.trainers.scm import SCMTrainer
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]


def rcm_data(model_dir, out, res=16, **sections):
    data = {
        "method": "rcm", "output_dir": str(out), "seed": 1, "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True},
        "scm": {"mode": "cd", "guidance_scale": 2.0, "tangent_warmup_steps": 0},
        "rcm": {"fake_lr": 1e-3, "fake_updates_per_student_update": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return data


def built(model_dir, out, **sections) -> RCMTrainer:
    t = RCMTrainer(build_config(RCMConfig, rcm_data(model_dir, out, **sections)))
    t.setup()
    return t


def test_dm_term_is_dmd2s_generator_loss_on_the_same_x_t_and_noise(pixel_dir, tmp_path):
    """rCM's L_DM is the shared DistributionMatching's: on the same x, generator state (t and
    noise) and conditioning, it equals DMD2's (GAN off, same real-score CFG, fake score
    initialised from the teacher) in value and in its gradient on x."""
    from diffdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

    r = built(pixel_dir, tmp_path / "rcm")
    data = rcm_data(pixel_dir, tmp_path / "dmd2")
    del data["scm"], data["rcm"]
    data.update(method="dmd2", dmd2={"guidance_scale": 2.0, "gan_generator_weight": 0.0,
                                     "gan_discriminator_weight": 0.0})
    d = DMD2Trainer(build_config(DMD2Config, data))
    d.setup()
    cond = r.backbone.class_cond(torch.tensor([1, 4]), guidance=True)
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = []
    for tr in (r, d):
        tr.generator.manual_seed(11)
        x = x0.clone().requires_grad_(True)
        loss, logs = tr.dm.generator_loss(x, cond)
        (grad,) = torch.autograd.grad(loss, x)
        out.append((loss.detach(), grad))
    assert float(out[0][0]) == pytest.approx(float(out[1][0]), rel=1e-6)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-12)
    assert float(out[0][1].abs().max()) > 0


def test_student_loss_is_scd_plus_weighted_dm_on_its_own_sample(pixel_dir, tmp_path):
    """One student step by hand: the sCD terms are SCMTrainer.loss_terms' on the same draws;
    the DM sample is the student's one-step x0̂ from the next noise drawn; the network's
    loss is L_sCD + λ·L_DM(x) with L_DM from the same generator state."""
    t = built(pixel_dir, tmp_path, rcm={"dm_weight": 0.3, "generator_steps": [1]})
    batch = next(t._batches())
    cond = t.cond_for_batch(batch, with_uncond=True)
    state = t.generator.get_state()
    terms = t.student_terms(batch)
    after = t.generator.get_state()
    t.generator.set_state(state)
    ref = SCMTrainer.loss_terms(t, batch)
    assert float(terms["loss_scd"]) == pytest.approx(float(ref["loss_net"].detach()), rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(float(ref["loss"].detach()), rel=1e-5)
    noise = t.randn(2, 3, 16, 16)
    with torch.no_grad():
        x = t.backbone.denoiser(t.unwrap(t.unet))(
            noise, torch.full((2,), 999.0, dtype=torch.float64), cond.replace(uncond=None)
        ).x0.float()
    # (an ε teacher's x0̂ at t = 999 is large: compare relative to its scale)
    assert float((terms["x"].detach() - x).abs().max() / x.abs().max()) < 1e-5
    loss_dm, _ = t.dm.generator_loss(x, cond)
    assert torch.equal(t.generator.get_state(), after)  # the same draws, in the same order
    want = float(ref["loss_net"].detach()) + 0.3 * float(loss_dm.detach())
    assert float(terms["loss_net"].detach()) == pytest.approx(want, rel=1e-5)
    # the DM term reaches the student's weights through its sample (x carries the graph)
    assert terms["x"].requires_grad and float(terms["grad_norm_dm"]) > 0


def test_schedule_student_every_ratio_th_step_after_the_warm_up(pixel_dir, tmp_path):
    t = built(pixel_dir, tmp_path, scm={"tangent_warmup_steps": 3},
              rcm={"fake_updates_per_student_update": 2})
    assert [t.is_student_step(k) for k in range(8)] == [True] * 3 + [True, False] * 2 + [True]
    assert t.dm_start == 3 and [t.generator_step_count(k) for k in (0, 2, 4, 6)] == [1, 2, 1, 2]
    # LoRA-free full run: the fake score is a separate copy, the real score the frozen teacher
    fake = t.unwrap(t.fake_score)
    assert fake is not t.teacher_tf.denoiser.unet and fake is not t.unwrap(t.unet)
    assert not any(p.requires_grad for p in t.teacher_tf.denoiser.unet.parameters())


def test_bad_configs_are_refused_in_one_line(pixel_dir, tmp_path):
    for over, key in [
            ({"rcm": {"fake_lr": None}}, "rcm.fake_lr"),
            ({"rcm": {"dm_weight": -1.0}}, "rcm.dm_weight"),
            ({"rcm": {"fake_updates_per_student_update": 0}}, "fake_updates_per_student"),
            ({"rcm": {"generator_steps": [4]}}, "rcm.generator_steps"),
            ({"rcm": {"generator_steps": []}}, "rcm.generator_steps"),
            ({"rcm": {"guidance_scale": 0.5}}, "rcm.guidance_scale"),
            ({"rcm": {"dm_t_min": 0.9, "dm_t_max": 0.5}}, "rcm.dm_t_min"),
            ({"scm": {"mode": "ct", "guidance_scale": 1.0}}, "scm.mode=cd"),
            ({"data": {"kind": "prompts", "path": "p.txt"}}, "data.kind='prompts'"),
            ({"train": {"compile": True}}, "with method rcm")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            build_config(RCMConfig, rcm_data(pixel_dir, tmp_path, **over))
        assert "\n" not in str(e.value)


def test_lora_export_loads_in_the_teachers_stock_pipeline(sd_dir, tmp_path, monkeypatch):
    """LoRA rCM on an SD-structured teacher: the fake score shares the base with the student
    (its own adapter); the exported LoRA in the teacher's stock pipeline + LCMScheduler
    reproduces the trainer's 1- and 2-step samples; the card's code runs."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from helpers import run_model_card_code

    data = rcm_data(sd_dir, tmp_path / "run", res=32, train={"lr": 1e-2})
    data["adapter"] = {"type": "lora", "rank": 4}
    t = RCMTrainer(build_config(RCMConfig, data))
    logs = t.fit()
    assert math.isfinite(logs["loss_fake_denoise"])
    student, fake = t.unwrap(t.unet), t.unwrap(t.fake_score)
    base_s = {n: p for n, p in student.named_parameters() if "lora_" not in n}
    base_f = {n: p for n, p in fake.named_parameters() if "lora_" not in n}
    assert base_s.keys() == base_f.keys() and all(base_s[n] is base_f[n] for n in base_s)
    assert all(".fake_score." in n for n, _ in fake.named_parameters() if "lora_" in n)
    export = tmp_path / "run" / "export"
    prompts = ["a photo of a bag", "a photo of a sneaker"]
    cond = t.backbone.encode_prompts(prompts, with_uncond=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.load_lora_weights(str(export))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    for steps in (1, 2):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        with torch.no_grad():
            stock = pipe(prompts, timesteps=t.sample_timesteps(steps).long().tolist(),
                         guidance_scale=1.0, height=32, width=32, generator=gens,
                         output_type="latent").images
        ours = t.sample_latents([5, 6], cond, steps)
        err = float((stock.double() - ours.double()).abs().max() / ours.double().abs().max())
        assert err < 1e-4 and float(ours.std()) > 0.1, steps
    assert "rcm" in (export / "README.md").read_text()
    run_model_card_code(export, tmp_path, monkeypatch)


def _rows(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = {k: v for k, v in r.items() if k != "it_per_s"}
    return rows


def test_sigkill_then_resume_latest_is_bit_identical(pixel_dir, tmp_path):
    """Killed with SIGKILL after checkpoint 3 of 6 (a separate process), resumed with
    ``diffdistill train CFG --resume latest``: the final checkpoint (student, EMA, weight
    head, fake score, RNG, all three optimizers) and every logged row — the student / fake
    phase and the 1-/2-step cycle included — equal an uninterrupted run's."""
    from helpers import sigkill_and_resume

    def run_data(out):
        data = rcm_data(pixel_dir, out, scm={"tangent_warmup_steps": 2},
                        train={"max_steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2,
                               "ema_decay": 0.9})
        return data

    a, b = sigkill_and_resume(run_data, tmp_path, kill_after=3, total=6)
    out, ref = tmp_path / "crash", tmp_path / "ref"
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    opts = sorted(p.name for p in a.glob("optimizer*.bin"))
    assert len(opts) == 3  # the student's, the weight head's, the fake score's
    for name in opts:
        sa = torch.load(a / name, map_location="cpu", weights_only=True)["state"]
        sb = torch.load(b / name, map_location="cpu", weights_only=True)["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
                   for i in sa for k in sa[i]), name
    rows = _rows(ref)
    assert _rows(out) == rows and sorted(rows) == list(range(1, 7))
    # warm-up (steps 0, 1: sCD only), then the student on every 2nd step with the DM term
    assert [("loss_dm" in rows[k]) for k in range(1, 7)] == [False, False] + [True, False] * 2
    assert all("loss_fake_denoise" in rows[k] for k in rows)


@pytest.mark.parametrize("name", ["toy", "sd15_lora"])
def test_shipped_configs_run_a_few_steps(name, sd_dir, tmp_path):
    from diffdistill.trainers import load_run_config

    out = tmp_path / name
    cls, cfg = load_run_config(ROOT / "configs" / "rcm" / f"{name}.yaml", [
        f"model.path={sd_dir}", f"output_dir={out}", "data.kind=fashion_mnist", "data.path=",
        "data.resolution=32", "data.limit=8", "train.max_steps=3", "train.batch_size=2",
        "train.checkpoint_every=0", "train.cpu=true", "train.mixed_precision=\"no\"",
        "model.frozen_dtype=fp32", "scm.tangent_warmup_steps=1",
        "rcm.fake_updates_per_student_update=2", "log.every=1", "log.grid_every=0", "log.progress=false",
        "log.tensorboard=false"])
    assert cls is RCMTrainer and cfg.rcm.fake_lr and cfg.rcm.dm_weight > 0
    logs = cls(cfg).fit()
    rows = _rows(out)
    assert "loss_dm" in rows[2] and math.isfinite(rows[2]["loss_dm"])  # step 2 = a DM step
    assert math.isfinite(logs["loss_fake_denoise"])
