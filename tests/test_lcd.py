"""LCD / LCM-LoRA and RG-LCD trainers on tiny stock-diffusers models (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.lcd import (
    LCDConfig,
    LCDTrainer,
    RGLCDConfig,
    RGLCDTrainer,
    lcm_student_unet,
)
from helpers import stock_sd_pipeline  # noqa: E402
from standins import TINY_CLIP, make_tiny_clip
from torch import nn

from diffdistill.config import build_config, deep_merge, load_yaml
from diffdistill.denoiser import Denoiser, LCMConsistency, guidance_scale_embedding
from diffdistill.export import EXPORT_INFO
from diffdistill.sampling import ddim_solver_step, generate
from diffdistill.schedule import VPSchedule
from diffdistill.tiny import SD_SCHEDULER

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def make_cfg(model_dir, out, *, cls=LCDConfig, adapter="full", steps=2, lr=1e-3, **sections):
    data = {
        "method": "lcd" if cls is LCDConfig else "rglcd", "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 32, "limit": 8},
        "train": {"max_steps": steps, "batch_size": 2, "lr": lr, "checkpoint_every": 0,
                  "cpu": True},
        "adapter": {"type": adapter, "rank": 4, "conv": True},
        "lcd": {"time_cond_proj_dim": 32},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    return build_config(cls, deep_merge(data, sections))


def ready(cfg, cls=LCDTrainer):
    tr = cls(cfg)
    tr.setup()
    return tr, next(tr._batches())


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- solver


class _FixedOutput(nn.Module):
    """A stand-in UNet that returns a fixed raw output (ε or v)."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, **kw):
        return (self.out,)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_solver_step_equals_stock_ddim_scheduler(prediction_type, set_alpha_to_one):
    from diffusers import DDIMScheduler

    cfg = {**SD_SCHEDULER, "set_alpha_to_one": set_alpha_to_one}
    stock = DDIMScheduler(**cfg, prediction_type=prediction_type)
    stock.set_timesteps(50)  # its step goes t -> t - 20, LCD's skipping step k
    schedule = VPSchedule.from_config(cfg)
    x, raw = _rand((3, 4, 8, 8), 0), _rand((3, 4, 8, 8), 1)
    t = torch.tensor([999.0, 519.0, 19.0])  # 19 - 20 < 0: DDIM's final alpha
    ours = ddim_solver_step(Denoiser(_FixedOutput(raw), schedule, prediction_type)(x, t),
                            schedule, t, t - 20)
    for i in range(3):
        ref = stock.step(raw[i:i + 1], int(t[i]), x[i:i + 1]).prev_sample
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-5, rtol=1e-5), (i, t[i])


@pytest.mark.parametrize("set_alpha_to_one", [None, True, False])
def test_lcm_solver_end_is_alpha_zero_whatever_the_scheduler_says(set_alpha_to_one):
    """end="first" (LCD's solver): t_to = −1 lands on ᾱ₀ = alphas_cumprod[0], as LCM's DDIM
    solver does, also when the teacher's config sets or omits set_alpha_to_one (diffusers'
    default, ᾱ = 1, is what end="scheduler" gives there)."""
    cfg = dict(SD_SCHEDULER)
    cfg.pop("set_alpha_to_one", None)
    if set_alpha_to_one is not None:
        cfg["set_alpha_to_one"] = set_alpha_to_one
    schedule = VPSchedule.from_config(cfg)
    x, raw = _rand((2, 4, 8, 8), 0), _rand((2, 4, 8, 8), 1)
    t = torch.tensor([19.0, 19.0])
    pred = Denoiser(_FixedOutput(raw), schedule, "epsilon")(x, t)
    acp0 = float(schedule.alphas_cumprod[0])
    expected = math.sqrt(acp0) * pred.x0 + math.sqrt(1 - acp0) * pred.eps
    assert torch.allclose(ddim_solver_step(pred, schedule, t, t - 20, end="first"), expected,
                          atol=1e-6)
    stock_end = ddim_solver_step(pred, schedule, t, t - 20)
    if set_alpha_to_one is False:
        assert torch.allclose(stock_end, expected, atol=1e-6)
    else:  # diffusers' final_alpha_cumprod = 1: the solver lands on x0̂ itself
        assert torch.allclose(stock_end, pred.x0, atol=1e-6)


def test_lcd_solver_ends_on_alpha_zero(sd_dir, tmp_path, monkeypatch):
    """The trainer asks the solver for LCM's end (ᾱ₀) on every consistency step."""
    import diffdistill.sampling as sampling

    tr, batch = ready(make_cfg(sd_dir, tmp_path))
    seen = []
    solver = sampling.ddim_solver_step
    monkeypatch.setattr(sampling, "ddim_solver_step",
                        lambda *a, **kw: seen.append(kw.get("end")) or solver(*a, **kw))
    tr.consistency_terms(batch)
    assert seen == ["first"]


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_key(sd_dir, pixel_dir, tmp_path):
    from diffdistill.config import ConfigError

    with pytest.raises(ConfigError, match="lcd.w_min"):
        make_cfg(sd_dir, tmp_path, lcd={"w_min": 9.0, "w_max": 3.0})
    with pytest.raises(ConfigError, match="lcd.export_steps"):
        make_cfg(sd_dir, tmp_path, lcd={"export_steps": 60})
    with pytest.raises(ConfigError, match="reward.path"):
        make_cfg(sd_dir, tmp_path, cls=RGLCDConfig)
    with pytest.raises(ConfigError, match="pixel model"):
        ready(make_cfg(pixel_dir, tmp_path, data={"resolution": 16}))


# ----------------------------------------------------------------------------- student


def test_full_student_starts_equal_to_the_teacher(sd_dir):
    from diffdistill.backbone import load_backbone

    bb = load_backbone(sd_dir, load_vae=False, load_text=False)
    student = lcm_student_unet(bb.unet, 32)
    assert student.config.time_cond_proj_dim == 32
    assert torch.equal(student.time_embedding.cond_proj.weight,
                       torch.zeros_like(student.time_embedding.cond_proj.weight))
    teacher_sd, student_sd = bb.unet.state_dict(), student.state_dict()
    assert set(student_sd) - set(teacher_sd) == {"time_embedding.cond_proj.weight"}
    assert all(torch.equal(student_sd[k], v) for k, v in teacher_sd.items())
    x, ehs = _rand((2, 4, 16, 16), 2), _rand((2, 77, 32), 3)
    t = torch.tensor([999, 259])
    emb = guidance_scale_embedding(torch.tensor([2.0, 9.0]), 32)
    with torch.no_grad():
        ref = bb.unet(x, t, encoder_hidden_states=ehs).sample
        assert torch.equal(student(x, t, encoder_hidden_states=ehs, timestep_cond=emb).sample,
                           ref)
        student.time_embedding.cond_proj.weight.normal_(0, 0.1)  # now w is seen
        moved = student(x, t, encoder_hidden_states=ehs, timestep_cond=emb).sample
    assert (moved - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------------- Alg. 1


def _v_to_x0_eps(v, x, t, acp):
    a = acp[t.long()].sqrt().view(-1, 1, 1, 1).float()
    s = (1 - acp[t.long()]).sqrt().view(-1, 1, 1, 1).float()
    return a * x - s * v, s * x + a * v


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_lcd_terms_follow_algorithm_1(adapter, sd_v_dir, tmp_path):
    """Guided teacher (LCM-form CFG, adapters off), DDIM step, boundary-conditioned target —
    recomputed from a stock teacher UNet of a v-prediction folder."""
    from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

    from diffdistill.losses import elementwise_huber

    tr, batch = ready(make_cfg(sd_v_dir, tmp_path, adapter=adapter))
    student_unet = tr.unwrap(tr.unet)
    if adapter == "lora":  # a non-trivial LoRA: the teacher pass must switch it off
        g = torch.Generator().manual_seed(0)
        for p in tr.trainable["unet"]:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
        assert tr.target.denoiser.unet is student_unet  # θ⁻ = online weights
    else:
        assert tr.target.denoiser.unet is not student_unet  # θ⁻ = EMA copy
    tr.generator.manual_seed(7)
    terms = tr.consistency_terms(batch)
    assert terms.student_x0.requires_grad and not terms.target_x0.requires_grad
    assert set(((terms.t_start + 1) % 20).tolist()) == {0}  # t = (i+1)k − 1
    assert torch.equal(terms.t_start - terms.t_end, torch.full_like(terms.t_start, 20))
    assert ((terms.w >= 5.0) & (terms.w <= 15.0)).all()

    teacher = UNet2DConditionModel.from_pretrained(str(sd_v_dir / "unet")).eval()
    acp = DDIMScheduler.from_pretrained(str(sd_v_dir / "scheduler")).alphas_cumprod.double()
    c, u = terms.cond.encoder_hidden_states, terms.cond.uncond.encoder_hidden_states
    x, t, w = terms.x_start, terms.t_start, terms.w.view(-1, 1, 1, 1)
    with torch.no_grad():
        x0_c, eps_c = _v_to_x0_eps(teacher(x, t, encoder_hidden_states=c).sample, x, t, acp)
        x0_u, eps_u = _v_to_x0_eps(teacher(x, t, encoder_hidden_states=u).sample, x, t, acp)
    x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    acp_to = torch.where(terms.t_end >= 0, acp[terms.t_end.clamp(min=0).long()], acp[0])
    x_end = acp_to.sqrt().view(-1, 1, 1, 1).float() * x0 + \
        (1 - acp_to).sqrt().view(-1, 1, 1, 1).float() * eps
    assert torch.allclose(terms.x_end, x_end, atol=1e-4), (terms.x_end - x_end).abs().max()

    t_end = terms.t_end.clamp(min=0)
    kw = {"encoder_hidden_states": c}
    if adapter == "full":
        kw["timestep_cond"] = guidance_scale_embedding(terms.w, 32)
    with torch.no_grad():
        x0_target, _ = _v_to_x0_eps(student_unet(terms.x_end, t_end, **kw).sample,
                                    terms.x_end, t_end, acp)
    c_skip, c_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t_end)
    target = (c_skip.view(-1, 1, 1, 1) * terms.x_end + c_out.view(-1, 1, 1, 1) * x0_target)
    assert torch.allclose(terms.target_x0, target.float(), atol=1e-4)
    assert torch.allclose(terms.loss, elementwise_huber(terms.student_x0, terms.target_x0,
                                                        c=0.001))


def test_first_grid_step_targets_the_solver_output(sd_dir, tmp_path):
    """t_{n+k} = k − 1: the solver lands on DDIM's final alpha and f(x, 0) = x is the target."""
    tr, batch = ready(make_cfg(sd_dir, tmp_path, adapter="lora"))
    tr.randint = lambda low, high, shape: torch.full(tuple(shape), high - 1)
    terms = tr.consistency_terms(batch)
    assert terms.t_start.tolist() == [19.0, 19.0] and terms.t_end.tolist() == [-1.0, -1.0]
    assert torch.equal(terms.target_x0, terms.x_end)
    # at t = 19 the student itself is nearly the identity too: c_skip(19) ≈ 0.9994
    assert not torch.equal(terms.student_x0, terms.x_start)


def test_full_target_is_an_ema_of_the_student(sd_dir, tmp_path):
    tr, batch = ready(make_cfg(sd_dir, tmp_path, lr=1e-2, lcd={"target_ema_decay": 0.9,
                                                               "time_cond_proj_dim": 32}))
    student = dict(tr.unwrap(tr.unet).named_parameters())
    target = dict(tr.target.denoiser.unet.named_parameters())
    shadow = tr.emas["target"][0].shadow
    names = ["conv_in.weight", "time_embedding.cond_proj.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    history = [{n: student[n].detach().clone() for n in names}]
    assert all(torch.equal(target[n], history[0][n]) for n in names)
    for _ in range(2):
        tr.train_step(batch)
        tr.update_emas()  # what fit() does after every successful step
        history.append({n: student[n].detach().clone() for n in names})
    for n in names:
        expected = history[0][n]
        for h in history[1:]:
            expected = 0.9 * expected + 0.1 * h[n]
        assert torch.allclose(target[n], expected, atol=1e-7), n
        assert not torch.equal(target[n], student[n])  # the target lags the student
        assert target[n].data_ptr() == shadow[n].data_ptr()  # θ⁻ is the EMA itself
        assert not target[n].requires_grad


def test_lora_training_leaves_base_weights_bit_identical(sd_dir, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    tr = LCDTrainer(make_cfg(sd_dir, tmp_path, adapter="lora", lr=1e-2))
    tr.fit()
    sd = tr.unwrap(tr.unet).state_dict()
    plain = {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k}
    assert plain.keys() == base.keys()
    assert all(torch.equal(plain[k], base[k]) for k in base)
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert len(lora_b) > 10 and all(v.abs().sum() > 0 for v in lora_b)  # it did train


# ----------------------------------------------------------------------------- exports


def _ours_float(tr, unet, steps, guidance_scale, timestep_cond=None, seeds=(3, 4),
                prompts=PROMPTS):
    """Our sampler: generate(..., sampler="lcm") on the student, images in [-1, 1]."""
    bb = tr.backbone

    def cond_fn(sl):
        cond = bb.encode_prompts(prompts[sl], with_uncond=guidance_scale != 1.0)
        if timestep_cond is not None:
            cond = cond.replace(timestep_cond=timestep_cond.expand(len(prompts[sl]), -1))
        return cond

    return generate(LCMConsistency(bb.denoiser(unet)), seeds=list(seeds), shape=(4, 16, 16),
                    cond_fn=cond_fn, sampler="lcm", num_steps=steps,
                    timesteps=tr.lcm_timesteps(steps), guidance_scale=guidance_scale,
                    decode=bb.decode_latents, output="float", progress=False)


def _ours(*args, **kw):
    return ((_ours_float(*args, **kw) + 1) / 2).clamp(0, 1)  # the stock pipelines' "pt"


def _stock(pipe, steps, guidance_scale, seeds=(3, 4)):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=gens, output_type="pt", height=32, width=32).images


def test_full_export_is_a_stock_lcm_pipeline_giving_the_same_images(sd_v_dir, tmp_path):
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler

    tr, batch = ready(make_cfg(sd_v_dir, tmp_path / "run", lcd={"guidance_scale": 6.0,
                                                                "time_cond_proj_dim": 32}))
    tr.train_step(batch)
    student = tr.unwrap(tr.unet)
    with torch.no_grad():  # make the w embedding matter, so the comparison tests it
        student.time_embedding.cond_proj.weight.normal_(0, 0.1,
                                                        generator=torch.Generator().manual_seed(0))
    out = tr.export(tmp_path / "export")
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["sampler"] == "lcm" and info["steps"] == 4 and info["guidance_scale"] == 6.0
    assert info["timesteps"] == [999, 759, 499, 259] and info["guidance_embedding"] is True
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, LatentConsistencyModelPipeline)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    emb = guidance_scale_embedding(torch.tensor([5.0]), 32)  # the pipeline embeds w = gs − 1
    for steps in (1, 2, 4):
        stock = _stock(pipe, steps, 6.0)
        ours = _ours(tr, student, steps, 1.0, timestep_cond=emb)
        assert (stock - ours).abs().max() <= 1e-4, steps
    assert (_stock(pipe, 2, 2.0) - _stock(pipe, 2, 6.0)).abs().max() > 1e-3
    # `diffdistill sample` reads the recorded steps/guidance and embeds w like the pipeline
    import numpy as np
    from PIL import Image

    from diffdistill.cli import main

    png = tmp_path / "cli.png"
    args = ["sample", str(out), "--seed", "3", "--num", "1", "--out", str(png)]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    grid = np.asarray(Image.open(png))
    stock4 = (_stock(pipe, 4, 6.0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for r in range(len(PROMPTS)):
        tile = grid[2 + r * 34: 2 + r * 34 + 32, 2:34]
        assert np.abs(tile.astype(int) - stock4[r].astype(int)).max() <= 1, r
    # the trainer's sample grid is the same sampler with the same embedded w
    from diffdistill.eval.prompts import EvalPrompts

    from diffdistill.sampling import to_uint8

    ref = _ours_float(tr, student, 4, 1.0, timestep_cond=emb, seeds=(0, 1),
                      prompts=[EvalPrompts().caption(0), EvalPrompts().caption(1)])
    assert torch.equal(tr.sample_images([0, 1]), to_uint8(ref))


def test_lora_export_loads_in_a_stock_pipeline_with_lcm_scheduler(sd_dir, tmp_path):
    from diffusers import LCMScheduler

    from diffdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    tr = LCDTrainer(make_cfg(sd_dir, tmp_path / "run", adapter="lora", lr=1e-2))
    tr.fit()
    out = tmp_path / "run" / "export"
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["sampler"] == "lcm" and info["guidance_scale"] == 1.0
    assert info["guidance_embedding"] is False
    assert (out / KOHYA_WEIGHT_NAME).is_file() and (out / "README.md").is_file()

    def stock_pipe(weight_name=None):
        return stock_sd_pipeline(sd_dir, LCMScheduler, out, weight_name)

    pipe = stock_pipe(LORA_WEIGHT_NAME)
    unet = tr.unwrap(tr.unet)
    for steps in (1, 2, 4, 8):
        stock = _stock(pipe, steps, 1.0)
        assert (stock - _ours(tr, unet, steps, 1.0)).abs().max() <= 1e-4, steps
    assert (_stock(stock_pipe(), 2, 1.0) - _stock(pipe, 2, 1.0)).abs().max() > 1e-3
    kohya = _stock(stock_pipe(KOHYA_WEIGHT_NAME), 2, 1.0)
    assert (kohya - _ours(tr, unet, 2, 1.0)).abs().max() <= 1e-4


def test_one_step_timestep_samples_exports_and_reloads(sd_dir, tmp_path):
    """lcd.onestep_timestep = 759: one step starts there (more steps keep LCM's grid), the
    export records it, the bench reads it back, the card says it, and a stock LCM pipeline
    called with timesteps=[759] reproduces the trainer's one-step sampler."""
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model
    from diffusers import LCMScheduler

    from diffdistill.export import LORA_WEIGHT_NAME

    tr = LCDTrainer(make_cfg(sd_dir, tmp_path / "run", adapter="lora", lr=1e-2,
                             lcd={"onestep_timestep": 759, "time_cond_proj_dim": 32}))
    tr.fit()
    assert tr.lcm_timesteps(1).tolist() == [759]
    assert tr.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert tr.eval_spec().grid_for(1).tolist() == [759.0]
    out = tmp_path / "run" / "export"
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["timesteps_by_steps"] == {"1": [759]} and info["timesteps"] == [999, 759, 499, 259]
    model = load_eval_model(BenchModel(name="l", path=str(sd_dir), lora=str(out)))
    assert model.grid_for(1).tolist() == [759.0] and model.grid_for(4).tolist() == [
        999.0, 759.0, 499.0, 259.0]
    assert "| 1-step timestep (pass timesteps=[t] for one step) | 759 |" in (
        out / "README.md").read_text()
    pipe = stock_sd_pipeline(sd_dir, LCMScheduler, out, LORA_WEIGHT_NAME)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        stock = pipe(PROMPTS, timesteps=[759], guidance_scale=1.0, generator=gens,
                     output_type="pt", height=32, width=32).images
    ours = _ours(tr, tr.unwrap(tr.unet), 1, 1.0)
    assert (stock - ours).abs().max() <= 1e-4
    assert (_stock(pipe, 1, 1.0) - ours).abs().max() > 1e-3  # 759 is not the default 999


def test_one_step_timestep_off_the_solver_grid_is_refused(sd_dir, tmp_path):
    from diffdistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"lcd.onestep_timestep=760 is not on the solver grid"):
        ready(make_cfg(sd_dir, tmp_path, lcd={"onestep_timestep": 760}))
    with pytest.raises(ConfigError, match="lcd.onestep_timestep must be >= 0"):
        make_cfg(sd_dir, tmp_path, lcd={"onestep_timestep": -1})


# ----------------------------------------------------------------------------- RG-LCD


def rg_cfg(sd_dir, out, tiny_clip, mode, adapter="lora", lrm_loss="softmax", **kw):
    cfg_file, weights, _ = tiny_clip
    return make_cfg(sd_dir, out, cls=RGLCDConfig, adapter=adapter,
                    rglcd={"mode": mode, "beta": 0.5},
                    reward={"kind": "clip", "path": str(weights), "model_name": TINY_CLIP,
                            "config_path": str(cfg_file)},
                    lrm={"width": 16, "depth": 2, "loss": lrm_loss}, **kw)


def test_rglcd_direct_reward_backpropagates_through_the_decoder(sd_dir, tiny_clip, tmp_path):
    tr, batch = ready(rg_cfg(sd_dir, tmp_path, tiny_clip, "direct"), RGLCDTrainer)
    tr.generator.manual_seed(1)
    terms = tr.consistency_terms(batch)
    reward = tr.reward_term.student_reward(terms)
    with torch.no_grad():
        ref = tr.reward_model(tr.backbone.decode_latents(terms.student_x0), terms.prompts)
    assert torch.allclose(reward.detach(), ref, atol=1e-6)
    grads = torch.autograd.grad(reward.sum(), tr.trainable["unet"], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    logs = tr.train_step(batch)
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss_lcd"]) - 0.5 * float(logs["reward"]), abs=1e-6)


@pytest.mark.parametrize("lrm_loss", ["softmax", "pairwise"])
def test_rglcd_lrm_fits_the_expert_on_triplets_and_guides_the_student(lrm_loss, sd_dir,
                                                                       tiny_clip, tmp_path):
    from diffdistill.trainers.lcd import pooled_text

    from diffdistill.rewards import lrm_preference_loss

    tr, batch = ready(rg_cfg(sd_dir, tmp_path, tiny_clip, "lrm", lrm_loss=lrm_loss),
                      RGLCDTrainer)
    lrm = tr.unwrap(tr.reward_term.lrm)
    tr.generator.manual_seed(2)
    terms = tr.consistency_terms(batch)
    reward = tr.reward_term.student_reward(terms)
    reward.sum().backward()
    assert all(p.grad is None and p.requires_grad for p in lrm.parameters())
    assert any(p.grad is not None for p in tr.trainable["unet"])  # the student is guided
    tr.optimizers["unet"].zero_grad(set_to_none=True)

    n = terms.x0.shape[0]
    cands = torch.stack([terms.student_x0.detach(), terms.target_x0, terms.x0], 1).flatten(0, 1)
    with torch.no_grad():
        expert = tr.reward_model(tr.backbone.decode_latents(cands),
                                 [p for p in terms.prompts for _ in range(3)]).view(n, 3)
        scores = lrm(cands, pooled_text(terms.cond).repeat_interleave(3, 0)).view(n, 3)
    expected = lrm_preference_loss(scores, expert, tr.reward_model.logit_scale,
                                   pairwise=lrm_loss == "pairwise").mean()
    lrm_before = [p.detach().clone() for p in lrm.parameters()]
    student_before = [p.detach().clone() for p in tr.trainable["unet"]]
    logs = tr.reward_term.update(terms)
    assert float(logs["loss_lrm"]) == pytest.approx(float(expected), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(lrm_before, lrm.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(student_before, tr.trainable["unet"]))


def test_rglcd_lrm_full_resume_is_bit_identical(sd_dir, tiny_clip, tmp_path):
    """Full student + EMA target (its weights are the EMA shadow) + the LRM's optimizer."""
    from safetensors.torch import load_file

    def run(out, steps, resume=None):
        cfg = rg_cfg(sd_dir, out, tiny_clip, "lrm", adapter="full", steps=steps,
                     train={"checkpoint_every": 1})
        RGLCDTrainer(cfg).fit(resume=resume)

    run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    run(tmp_path / "b", 2, resume="latest")
    ca, cb = list_checkpoints(tmp_path / "a")[-1], list_checkpoints(tmp_path / "b")[-1]
    files = sorted(p.name for p in ca.glob("*.safetensors") if "rng" not in p.name)
    assert "trainer_tensors.safetensors" in files and len(files) >= 3  # student, LRM, EMA
    for name in files:
        ta, tb = load_file(str(ca / name)), load_file(str(cb / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    la = [json.loads(x)["loss_lrm"] for x in (tmp_path / "a" / "metrics.jsonl").open()]
    lb = [json.loads(x)["loss_lrm"] for x in (tmp_path / "b" / "metrics.jsonl").open()]
    assert la == lb


# ----------------------------------------------------------------------------- configs


CONFIGS = [
    ("lcd/toy.yaml", "sd"), ("lcd/toy_lora.yaml", "sd"), ("lcd/sd15_full.yaml", "sd"),
    ("lcd/sd15_lora.yaml", "sd"), ("lcd/sdxl_lora.yaml", "sdxl"), ("rglcd/toy.yaml", "sd"),
    ("rglcd/toy_lrm.yaml", "sd"), ("rglcd/sd15.yaml", "sd"),
]


@pytest.mark.parametrize("name,kind", CONFIGS)
def test_config_runs_one_step_on_a_tiny_model_of_its_structure(name, kind, sd_dir, sdxl_dir,
                                                               tiny_clip, tmp_path):
    from diffdistill.trainers import load_run_config

    path = ROOT / "configs" / name
    raw = load_yaml(path)
    overrides = [
        f"model.path={sdxl_dir if kind == 'sdxl' else sd_dir}", "model.frozen_dtype=fp32",
        "data.kind=fashion_mnist", "data.path=", "data.resolution=32", "data.limit=4",
        "data.num_workers=0", f"output_dir={tmp_path}", "train.max_steps=1",
        "train.batch_size=2", "train.cpu=true", "train.mixed_precision='no'",
        "train.checkpoint_every=0", "log.progress=false", "log.tensorboard=false",
        "log.grid_every=0",
    ]
    if raw["method"] == "rglcd":
        cfg_file, weights, model = tiny_clip
        if raw["reward"]["kind"] == "hpsv2":  # an HPS-style {"state_dict": ...} checkpoint
            weights = tmp_path / "hps.pt"
            torch.save({"state_dict": model.state_dict()}, weights)
        overrides += [f"reward.path={weights}", f"reward.model_name={TINY_CLIP}",
                      f"reward.config_path={cfg_file}"]
    cls, cfg = load_run_config(path, overrides)
    assert cls.method == raw["method"]
    # the recipe itself is what runs: the method sections are the file's
    assert {k: getattr(cfg.lcd, k) for k in raw["lcd"]} == raw["lcd"]
    assert cfg.adapter.type == raw["adapter"]["type"]
    logs = cls(cfg).fit()
    assert math.isfinite(float(logs["loss"]))
    info = json.loads((tmp_path / "export" / EXPORT_INFO).read_text())
    assert info["guidance_embedding"] == (cfg.adapter.type == "full")
    # the reward network it trained against, by content: the bench's "judge = reward" mark
    from diffdistill.eval.harness import judged_by_its_reward

    from diffdistill.fingerprint import file_sha256

    if raw["method"] == "rglcd":
        (net,) = info["reward_networks"]
        assert net["kind"] == raw["reward"]["kind"]
        assert list(net["sha256"].values()) == [file_sha256(weights)]
        assert judged_by_its_reward(info, {file_sha256(weights)})
        assert not judged_by_its_reward(info, {file_sha256(cfg_file)})
    else:
        assert info["reward_networks"] == []
