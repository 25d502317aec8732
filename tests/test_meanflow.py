"""MeanFlow (Geng et al. 2025): the second time input on stock backbones (UNet2DModel,
UNet2DConditionModel, SD3 transformer; zero-init = the teacher), the target on a network
whose u is known in closed form, r = t as flow matching, the guided targets, the sampler, the
exports against the trainer's own samples (the model cards' code run), one-line config
refusals, SIGKILL + resume bit-identical, 2 processes, the shipped configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffdistill.trainers.meanflow import MeanFlowConfig, MeanFlowTrainer, draw_t_r
from safetensors.torch import load_file
from torch import nn

from diffdistill.config import ConfigError, build_config
from diffdistill.denoiser import Cond, Denoiser
from diffdistill.flowmap import (
    FlowMap,
    adaptive_weight,
    add_second_time,
    delta_embedding,
    flow_time,
    meanflow_loss,
    meanflow_target,
    native_time,
)
from diffdistill.jvp import jvp
from diffdistill.sampling import sample_meanflow
from diffdistill.schedule import FlowSchedule, VPSchedule

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def mf_data(model_dir, out, *, meanflow=None, train=None, log=None, resolution=16):
    return {
        "method": "meanflow", "output_dir": str(out), "seed": 1,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": resolution, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True, **(train or {})},
        "meanflow": dict(meanflow or {}),
        "log": {"every": 1, "progress": False, "tensorboard": False, **(log or {})},
    }


def built(model_dir, out, **kw) -> MeanFlowTrainer:
    t = MeanFlowTrainer(build_config(MeanFlowConfig, mf_data(model_dir, out, **kw)))
    t.setup()
    return t


# ----------------------------------------------------------------------------- a closed form


class LinearFlowNet(nn.Module):
    """A 'network' on a rectified flow (prediction ``flow``: its output is u) with
    u(z, r, t) = a·z + b·r + c·t, reading t from the timestep (1000·t) and Δ = t − r back from
    the Δ-embedding's slowest sinusoid (1000·Δ·1e-4 = 0.1·Δ, recovered by atan2)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=F64))
        self.b, self.c = 0.3, -1.1
        self.config = SimpleNamespace(time_cond_proj_dim=dim)
        self.dim = dim

    def forward(self, x, timestep, timestep_cond=None):
        half = self.dim // 2
        delta = 10.0 * torch.atan2(timestep_cond[:, half - 1], timestep_cond[:, -1]).to(F64)
        t = timestep.to(F64) / 1000
        r = t - delta
        bc = (-1,) + (1,) * (x.ndim - 1)
        return self.a * x + (self.b * r + self.c * t).reshape(bc)


def linear_flow_map() -> FlowMap:
    net = LinearFlowNet()
    return FlowMap(Denoiser(net, FlowSchedule(1000), "flow", compute_dtype=F64))


def test_target_on_a_network_whose_u_is_linear_in_z_r_t():
    """du/dt along (v, 0, 1) of u = a z + b r + c t is a·v + c (r held: the Δ input moves with
    t), so u_tgt = v − (t − r)(a v + c) — by forward-mode AD and by central differences."""
    fm = linear_flow_map()
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g,
                                                                          dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=F64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=F64)
    a, b, c = 0.7, 0.3, -1.1
    bc = (-1, 1, 1, 1)
    u_hand = a * z + (b * r + c * t).reshape(bc)
    # central differences: the Δ-embedding is float32 (as diffusers' time embeddings), which
    # bounds their precision (~1e-7/h)
    for method, tol in (("autograd", 1e-6), ("finite_difference", 1e-3)):
        u, dudt = jvp(lambda z_, t_: fm.average_velocity(z_, r, t_), (z, t),
                      (v, torch.ones_like(t)), method=method, fd_eps=1e-2)
        assert torch.allclose(u, u_hand, atol=1e-6), method
        assert torch.allclose(dudt, a * v + c, atol=tol), method
        target = meanflow_target(v, dudt, t, r)
        assert torch.allclose(target, v - (t - r).reshape(bc) * (a * v + c), atol=tol)
    # r = t: the target is v itself (flow matching), whatever du/dt is
    assert torch.equal(meanflow_target(v, dudt, t, t), v)
    # the loss: per sample w·‖Δ‖², w = 1/(‖Δ‖² + c)^p, no gradient through w or the target
    uu = u.clone().requires_grad_(True)
    value, sq = meanflow_loss(uu, target, p=1.0, c=1e-3)
    hand_sq = (u - target).pow(2).flatten(1).sum(1)
    assert torch.allclose(sq, hand_sq) and torch.allclose(value, hand_sq / (hand_sq + 1e-3))
    value.sum().backward()
    w = adaptive_weight(hand_sq, 1.0, 1e-3)
    assert torch.allclose(uu.grad, 2 * w.reshape(bc) * (u - target))


def test_sampler_jumps_along_the_closed_form():
    """One NFE: x = ε − u(ε, 0, 1); two: z_.5 = ε − .5·u(ε, .5, 1), x = z_.5 − .5·u(z_.5, 0, .5)."""
    fm = linear_flow_map()
    eps = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    a, b, c = 0.7, 0.3, -1.1

    def u(z, r, t):
        return a * z + b * r + c * t

    one = sample_meanflow(fm, eps, torch.tensor([1000.0]))
    assert torch.allclose(one, eps - u(eps, 0, 1), atol=1e-6)
    two = sample_meanflow(fm, eps, torch.tensor([1000.0, 500.0]))
    mid = eps - 0.5 * u(eps, 0.5, 1)
    assert torch.allclose(two, mid - 0.5 * u(mid, 0, 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="needs a flow map"):  # a plain denoiser: one line
        sample_meanflow(fm.denoiser, eps, torch.tensor([1000.0]))


def test_flow_time_round_trips_on_a_vp_table():
    sched = VPSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                    "beta_end": 0.012})
    t = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=F64)
    assert torch.allclose(flow_time(sched, native_time(sched, t)), t, atol=1e-9)
    alpha, sigma = sched.alpha_sigma(torch.tensor(999.0))
    t_hi = float(sigma / (alpha + sigma))
    assert math.isclose(float(flow_time(sched, 999)), t_hi)
    # the sampler's default grid: even in flow time from t_max to 0 (t_max itself exact)
    from diffdistill.sampling import default_timesteps

    grid = default_timesteps("meanflow", sched, 2)
    assert float(grid[0]) == 999.0 and math.isclose(float(flow_time(sched, grid[1])), t_hi / 2)
    assert default_timesteps("meanflow", FlowSchedule(1000), 4).tolist() == [1000, 750, 500, 250]


# ----------------------------------------------------------------------------- the second time


@pytest.mark.parametrize("which", ["pixel", "sd"])
def test_zero_initialised_second_time_is_the_teacher_exactly(which, pixel_dir, sd_dir):
    """The stock-diffusers student (UNet2DModel → identity class slot + class table + zero
    Δ-MLP; UNet2DConditionModel → time_cond_proj_dim with a zero cond_proj) gives the
    teacher's output bit for bit at every Δ; the UNet part reloads with the stock class."""
    from diffdistill.backbone import load_backbone

    bb = load_backbone(str(pixel_dir if which == "pixel" else sd_dir))
    teacher = bb.unet.eval()
    student = add_second_time(teacher).eval()
    g = torch.Generator().manual_seed(0)
    if which == "pixel":
        x = torch.randn(2, 3, 16, 16, generator=g)
        kw = {"class_labels": torch.tensor([3, 10])}
        dim = student.delta_dim
    else:
        x = torch.randn(2, 4, 8, 8, generator=g)
        kw = {"encoder_hidden_states": torch.randn(2, 5, teacher.config.cross_attention_dim,
                                                   generator=g)}
        dim = student.config.time_cond_proj_dim
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad():
        ref = teacher(x, t, **kw).sample
        for delta in ([0.0, 0.0], [0.7, 0.2]):
            out = student(x, t, timestep_cond=delta_embedding(torch.tensor(delta), dim),
                          **kw).sample
            assert torch.equal(out, ref), delta
    # and through the flow frame: u(z, t, t) = the teacher's velocity ε̂ − x0̂ at (z, t)
    den = bb.denoiser(student)
    fm = FlowMap(den)
    z = x / 2
    tt = torch.tensor([0.8, 0.3], dtype=F64)
    cond = Cond(**kw)
    xn, tau = fm.to_native(z, tt)
    with torch.no_grad():
        pred = bb.denoiser(teacher)(xn, tau, cond)
        assert torch.equal(fm.average_velocity(z, tt, tt, cond), pred.eps - pred.x0)
        assert torch.equal(fm.average_velocity(z, tt / 2, tt, cond), pred.eps - pred.x0)
    if which == "pixel":  # CFG on a jump: one batched call, u + s (c − u) on x0̂ and ε̂
        null = Cond(class_labels=torch.full((2,), bb.null_class))
        with torch.no_grad():
            g = fm.jump(xn, tau, Cond(**kw, uncond=null), 0.1, guidance_scale=2.5)
            c, u = fm.jump(xn, tau, Cond(**kw), 0.1), fm.jump(xn, tau, null, 0.1)
        assert torch.allclose(g.x0, u.x0 + 2.5 * (c.x0 - u.x0), rtol=1e-5, atol=1e-4)
        assert torch.allclose(g.eps, u.eps + 2.5 * (c.eps - u.eps), rtol=1e-5, atol=1e-4)
    if which == "sd":
        from diffusers import UNet2DConditionModel

        assert type(student) is UNet2DConditionModel


# ----------------------------------------------------------------------------- the trainer


def test_draw_t_r_is_sorted_logit_normal_with_the_share_of_r_neq_t():
    g = torch.Generator().manual_seed(0)
    t, r = draw_t_r(20000, -0.4, 1.0, 0.25, g, (0.01, 0.99))
    assert bool((t >= r).all()) and float(t.min()) >= 0.01 and float(t.max()) <= 0.99
    assert abs(float((t > r).double().mean()) - 0.25) < 0.02
    g = torch.Generator().manual_seed(0)
    a = torch.sigmoid(-0.4 + torch.randn(20000, generator=g, dtype=F64))
    b = torch.sigmoid(-0.4 + torch.randn(20000, generator=g, dtype=F64))
    assert torch.equal(t, torch.maximum(a, b).clamp(0.01, 0.99))


def test_r_equal_t_is_flow_matching_and_the_step_is_its_formula(pixel_dir, tmp_path):
    """With r = t everywhere the target is exactly the data velocity ε − x (flow matching);
    with r ≠ t it is v − (t − r)·du/dt, du/dt the JVP of the student along (v, 0, 1); the loss
    is the adaptively weighted ‖u − u_tgt‖² (p = 1, c = 1e-3)."""
    t = built(pixel_dir, tmp_path / "fm", meanflow={"init": "scratch",
                                                   "r_neq_t_ratio": 0.0})
    batch = next(t._batches())
    terms = t.loss_terms(batch)
    assert torch.equal(terms["t"], terms["r"])
    assert torch.equal(terms["target"], terms["v"].float())
    tt = terms["t"].float().reshape(-1, 1, 1, 1)
    eps = (terms["z"] - (1 - tt) * terms["x0"]) / tt
    assert torch.allclose(terms["v"], eps - terms["x0"], atol=1e-4)
    sq = (terms["u"].detach() - terms["v"]).pow(2).flatten(1).sum(1)
    assert torch.allclose(terms["loss"].detach(), (sq / (sq + 1e-3)).mean())

    t = built(pixel_dir, tmp_path / "mf", meanflow={"init": "scratch", "r_neq_t_ratio": 1.0})
    terms = t.loss_terms(next(t._batches()))
    tr, r = terms["t"], terms["r"]
    assert bool((tr > r).all())
    _, dudt = jvp(lambda z_, t_: t.side.average_velocity(z_, r, t_, Cond(
        class_labels=batch["class_label"])), (terms["z"], tr), (terms["v"], torch.ones_like(tr)))
    assert torch.allclose(terms["dudt"], dudt, rtol=1e-5, atol=1e-5)
    hand = terms["v"] - (tr - r).float().reshape(-1, 1, 1, 1) * dudt
    assert torch.allclose(terms["target"], hand, atol=1e-4)
    # meanflow.jvp=finite_difference: the same draws, du/dt by central differences (at the
    # default step 1e-4; 1e-3 is 11 % off here: the 1000·t time embedding's fast sinusoids)
    fd = built(pixel_dir, tmp_path / "fd", meanflow={"init": "scratch", "r_neq_t_ratio": 1.0,
                                                    "jvp": "finite_difference"})
    fd_terms = fd.loss_terms(next(fd._batches()))
    assert torch.equal(fd_terms["t"], tr) and torch.equal(fd_terms["z"], terms["z"])
    err = (fd_terms["dudt"] - terms["dudt"]).abs().max() / terms["dudt"].abs().max()
    assert float(err) < 1e-2, float(err)


def test_guided_targets_data_eq19_and_the_teachers_cfg(pixel_dir, tmp_path):
    """Data, ω = 2: kept samples get ṽ = ω v + (1 − ω) u_θ(z, t, t | ∅); dropped ones plain v.
    Teacher: v = the guided teacher velocity, and the untrained student's u(z, t, t) is the
    unguided teacher's velocity exactly."""
    t = built(pixel_dir, tmp_path / "d", meanflow={"init": "scratch", "guidance_scale": 2.0,
                                                  "cond_dropout": 0.5},
              train={"batch_size": 8})
    batch = next(t._batches())
    cond, drop = t.conditions(batch)
    assert drop is not None and 0 < int(drop.sum()) < 8
    null = t.backbone.null_class
    assert torch.equal(cond.class_labels[drop], torch.full((int(drop.sum()),), null))
    x0 = t.encode_x0(batch)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    tt = torch.full((8,), 0.6, dtype=F64)
    z = 0.4 * x0 + 0.6 * eps
    v = t.velocity(x0, eps, z, tt, cond, drop)
    with torch.no_grad():
        vn = t.side.average_velocity(z, tt, tt, cond.uncond)
    keep = ~drop
    assert torch.allclose(v[keep], 2 * (eps - x0)[keep] - vn[keep], atol=1e-5)
    assert torch.equal(v[drop], (eps - x0)[drop])

    s = built(pixel_dir, tmp_path / "t", meanflow={"source": "teacher", "guidance_scale": 3.0})
    b = next(s._batches())
    cond, _ = s.conditions(b)
    x0 = s.encode_x0(b)
    z = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    tt = torch.tensor([0.5, 0.5], dtype=F64)
    xn, tau = s.student.to_native(z, tt)
    with torch.no_grad():
        guided = s.teacher_denoiser.guided(xn, tau, cond, 3.0)
        plain = s.teacher_denoiser(xn, tau, cond.replace(uncond=None))
        u = s.student.average_velocity(z, tt, tt, cond.replace(uncond=None))
    assert torch.equal(s.velocity(x0, None, z, tt, cond, None), guided.eps - guided.x0)
    assert torch.equal(u, plain.eps - plain.x0)


def test_bad_configs_are_refused_in_one_line(pixel_dir, tmp_path):
    bad = [
        ({"source": "teacher", "init": "scratch"}, "meanflow.init=scratch"),
        ({"r_neq_t_ratio": 1.5}, "meanflow.r_neq_t_ratio"),
        ({"guidance_scale": 0.5}, "meanflow.guidance_scale"),
        ({"guidance_scale": 2.0, "cond_dropout": 0.0}, "meanflow.cond_dropout"),
        ({"jvp": "reverse"}, "meanflow.jvp"),
        ({"two_step_t": 1.0}, "meanflow.two_step_t"),
        ({"adaptive_c": 0.0}, "meanflow.adaptive_p"),
        ({"p_std": 0}, "meanflow.p_std"),
    ]
    for section, key in bad:
        with pytest.raises(ConfigError) as e:
            build_config(MeanFlowConfig, mf_data(pixel_dir, tmp_path / "x", meanflow=section))
        assert key in str(e.value) and "\n" not in str(e.value), section
    data = mf_data(pixel_dir, tmp_path / "x")
    data["adapter"] = {"type": "lora"}
    with pytest.raises(ConfigError, match="adapter.type=lora"):
        build_config(MeanFlowConfig, data)
    with pytest.raises(ConfigError, match="meanflow.bogus"):
        build_config(MeanFlowConfig, mf_data(pixel_dir, tmp_path / "x", meanflow={"bogus": 1}))
    # guidance on an unconditional pixel UNet: refused when the run starts, in one line
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffdistill.backbone import load_backbone

    bb = load_backbone(str(pixel_dir))
    cfg = {k: v for k, v in dict(bb.unet.config).items() if not k.startswith("_")}
    unc = tmp_path / "unconditional"
    DDPMPipeline(unet=UNet2DModel.from_config({**cfg, "num_class_embeds": None}),
                 scheduler=DDPMScheduler.from_config(
                     bb.scheduler_config)).save_pretrained(str(unc))
    with pytest.raises(ConfigError, match="meanflow.guidance_scale=2.0 needs an unconditional"):
        built(unc, tmp_path / "u", meanflow={"init": "scratch", "guidance_scale": 2.0})


# ----------------------------------------------------------------------------- exports


def test_pixel_export_card_reproduces_the_trainers_1_and_2_nfe_samples(
        pixel_dir, tmp_path, monkeypatch):
    """From scratch (class-conditional, Eq. 19 guidance): the export is a stock UNet2DModel
    folder + the two-time file; the model card's code, run as written, gives the trainer's
    1-NFE image, and its u() stepped twice (1 → .5 → 0) the 2-NFE sample."""
    from diffdistill.export import card_code

    t = MeanFlowTrainer(build_config(MeanFlowConfig, mf_data(
        pixel_dir, tmp_path / "run", meanflow={"init": "scratch", "guidance_scale": 2.0},
        train={"lr": 1e-2, "ema_decay": 0.9})))
    t.fit()
    export = tmp_path / "run" / "export"
    info = json.loads((export / "diffdistill_export.json").read_text())
    assert info["sampler"] == "meanflow" and info["timesteps"] == [1000]
    assert info["timesteps_by_steps"] == {"2": [1000, 500]}
    extra = load_file(str(export / "two_time_embedding.safetensors"))
    assert float(extra["linear_2.weight"].abs().max()) > 0  # the Δ-MLP trained off zero
    monkeypatch.chdir(tmp_path)
    code = card_code(export / "README.md")
    assert len(code.strip().splitlines()) <= 14  # 4 of them imports
    scope: dict = {}
    exec(code, scope)
    cond = t.backbone.class_cond(torch.tensor([0]), guidance=False)
    one = t.sample_latents([0], cond, 1)
    expected = ((one.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0]
    assert torch.equal(scope["image"], expected) and float(one.std()) > 0.1
    u, y = scope["u"], torch.tensor([0])
    eps = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mid = eps - 0.5 * u(eps, torch.full((1,), 0.5), torch.ones(1), y)
        two = mid - 0.5 * u(mid, torch.zeros(1), torch.full((1,), 0.5), y)
    ours = t.sample_latents([0], cond, 2)
    assert torch.allclose(two.clamp(-1, 1), ours, atol=1e-5)


def test_latent_export_is_the_stock_lcm_pipeline_at_guidance_1_plus_t(sd_dir, tmp_path,
                                                                    monkeypatch):
    """Distilled from an SD-structured ε teacher: the export is a stock
    LatentConsistencyModelPipeline folder (UNet with time_cond_proj_dim); the card's one call
    at guidance_scale = 1 + t_max reproduces the trainer's 1-NFE image."""
    import numpy as np
    from diffusers import UNet2DConditionModel

    from diffdistill.export import card_code

    t = MeanFlowTrainer(build_config(MeanFlowConfig, mf_data(
        sd_dir, tmp_path / "run", resolution=32, train={"lr": 1e-2},
        meanflow={"source": "teacher", "guidance_scale": 2.0, "r_neq_t_ratio": 1.0})))
    t.fit()
    export = tmp_path / "run" / "export"
    unet = UNet2DConditionModel.from_pretrained(str(export), subfolder="unet")
    assert unet.config.time_cond_proj_dim == t.student.delta_dim
    assert float(unet.time_embedding.cond_proj.weight.detach().abs().max()) > 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(card_code(export / "README.md"), scope)
    cond = t.backbone.encode_prompts([t.card_prompt()], with_uncond=False)
    img = t.backbone.decode_latents(t.sample_latents([0], cond, 1))
    ours = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)
    theirs = torch.from_numpy(np.array(scope["image"]))
    assert (ours.int() - theirs.int()).abs().max() <= 1 and float(ours.float().std()) > 1


def test_sd3_student_starts_as_the_teacher_and_its_export_is_the_stock_sd3_pipeline(
        sd3_dir, tmp_path, monkeypatch):
    """SD3-structured flow teacher: the Δ-embedding appended to the pooled text through
    zero-initialised columns gives the teacher's velocity exactly (stock SD3Transformer2DModel
    with a wider pooled_projection_dim); after training, the card's one call of the stock
    StableDiffusion3Pipeline (sigmas [1.0], pooled = [text, Δ-embedding]) reproduces the
    trainer's 1-NFE image."""
    import numpy as np
    from diffusers import SD3Transformer2DModel

    from diffdistill.backbone import load_backbone
    from diffdistill.export import card_code

    bb = load_backbone(str(sd3_dir))
    teacher = bb.unet.eval()
    student = add_second_time(teacher, 16).eval()
    assert type(student) is SD3Transformer2DModel
    cond = bb.encode_prompts(["a photo of a bag", "a photo of a shirt"], with_uncond=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tt = torch.tensor([0.7, 0.2], dtype=F64)
    with torch.no_grad():
        pred = bb.denoiser(teacher)(x, tt * 1000, cond)
        u = FlowMap(bb.denoiser(student), 16).average_velocity(x, tt / 3, tt, cond)
    assert torch.equal(u, pred.eps - pred.x0)

    t = MeanFlowTrainer(build_config(MeanFlowConfig, mf_data(
        sd3_dir, tmp_path / "run", resolution=32, train={"lr": 1e-2},
        meanflow={"source": "teacher", "guidance_scale": 2.0, "r_neq_t_ratio": 1.0,
                  "delta_embedding_dim": 16})))
    t.fit()
    export = tmp_path / "run" / "export"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(card_code(export / "README.md"), scope)
    c = t.backbone.encode_prompts([t.card_prompt()], with_uncond=False)
    img = t.backbone.decode_latents(t.sample_latents([0], c, 1))
    ours = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)
    theirs = torch.from_numpy(np.array(scope["image"]))
    assert (ours.int() - theirs.int()).abs().max() <= 1 and float(ours.float().std()) > 1
    tr = SD3Transformer2DModel.from_pretrained(str(export), subfolder="transformer")
    cols = tr.time_text_embed.text_embedder.linear_1.weight.detach()[:, -16:]
    assert float(cols.abs().max()) > 0  # the Δ columns trained off zero


# ----------------------------------------------------------------------------- resume, configs


def _rows(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = {k: v for k, v in row.items()
                                 if k not in ("it_per_s", "time", "wall_s")}
    return rows


def test_sigkill_then_resume_latest_is_bit_identical(pixel_dir, tmp_path):
    """Killed with SIGKILL after checkpoint 3 of 8 (a separate process), resumed with
    ``diffdistill train CFG --resume latest``: the final weights, EMA and optimizer state, and
    every logged row, equal an uninterrupted run's (Eq. 19 guidance: dropout draws included)."""
    from helpers import sigkill_and_resume

    def run_data(out):
        data = mf_data(pixel_dir, out, meanflow={"init": "scratch", "guidance_scale": 2.0,
                                                 "r_neq_t_ratio": 0.5},
                       train={"max_steps": 8, "checkpoint_every": 1, "keep_checkpoints": 2,
                              "ema_decay": 0.9})
        return data

    a, b = sigkill_and_resume(run_data, tmp_path, kill_after=3, total=8)
    out, ref = tmp_path / "crash", tmp_path / "ref"
    files = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    assert files
    for name in files:
        if name.endswith(".safetensors"):
            sa, sb = load_file(str(a / name)), load_file(str(b / name))
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        else:
            sa = torch.load(a / name, map_location="cpu", weights_only=True)
            sb = torch.load(b / name, map_location="cpu", weights_only=True)
            assert _same(sa, sb), name
    rows = _rows(ref)
    assert _rows(out) == rows and sorted(rows) == list(range(1, 9))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


DDP_PROBE = """
import hashlib, json, sys, torch
from diffdistill.config import build_config
from diffdistill.trainers.meanflow import MeanFlowConfig, MeanFlowTrainer

def digest(ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

t = MeanFlowTrainer(build_config(MeanFlowConfig, json.load(open(sys.argv[1]))))
t.fit()
out = {"rank": t.rank, "world": t.world, "weights": digest(t.trainable["unet"]),
       "ema": digest(t.emas["unet"][0].shadow.values()), "noise": digest([t.generator.get_state()])}
(t.out / f"probe-{t.rank}.json").write_text(json.dumps(out))
"""


def test_two_processes_hold_the_same_student(pixel_dir, tmp_path):
    """DDP on 2 CPU processes (Eq. 19 guidance, r ≠ t, EMA): both ranks see world size 2, end
    with identical weights and EMA from different noise streams; one export is written."""
    from helpers import free_port

    out = tmp_path / "ddp"
    data = mf_data(pixel_dir, out, meanflow={"init": "scratch", "guidance_scale": 2.0,
                                             "r_neq_t_ratio": 0.5},
                   train={"ema_decay": 0.9, "cpu": False})
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    (tmp_path / "probe.py").write_text(DDP_PROBE)
    accel = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accel), "launch", "--config_file",
                        str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                        str(free_port()), str(tmp_path / "probe.py"), str(tmp_path / "cfg.json")],
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (json.loads((out / f"probe-{k}.json").read_text()) for k in (0, 1))
    assert a["world"] == b["world"] == 2 and (a["rank"], b["rank"]) == (0, 1)
    assert a["weights"] == b["weights"] and a["ema"] == b["ema"] and a["noise"] != b["noise"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert {row["world_size"] for row in rows if "loss" in row} == {2}
    assert (out / "export" / "two_time_embedding.safetensors").is_file()


@pytest.mark.parametrize("name", ["toy_pixel", "toy", "toy_flow"])
def test_shipped_configs_run_a_few_steps(name, pixel_dir, sd_dir, sd3_dir, tmp_path):
    from diffdistill.trainers import load_run_config

    out = tmp_path / name
    model, res = {"toy_pixel": (pixel_dir, 16), "toy": (sd_dir, 32),
                  "toy_flow": (sd3_dir, 32)}[name]
    cls, cfg = load_run_config(ROOT / "configs" / "meanflow" / f"{name}.yaml", [
        f"model.path={model}", f"output_dir={out}", f"data.resolution={res}", "data.limit=8",
        "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=0",
        "train.cpu=true", "log.grid_every=2", "log.grid_size=2", "log.progress=false",
        "log.tensorboard=false", "eval.every=0"])
    assert cls is MeanFlowTrainer
    c = cfg.meanflow
    assert (c.p_mean, c.p_std, c.adaptive_p, c.adaptive_c) == (-0.4, 1.0, 1.0, 1e-3)
    if name == "toy_pixel":
        assert (c.source, c.init) == ("data", "scratch") and c.guidance_scale > 1
    else:
        assert (c.source, c.init) == ("teacher", "pretrained") and c.guidance_scale > 1
    last = cls(cfg).fit()
    assert math.isfinite(last["loss"]) and last["mse"] > 0
    assert list((out / "samples").glob("*.png"))
