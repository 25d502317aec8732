"""sCM trainer (sCT / sCD, Lu & Song 2024): the proposal, the tangent g, its normalisation and
the adaptive weighting against hand computations; the step's wiring reproduced from the
formulas; sCD's guided teacher velocity; one-line config refusals; SIGKILL + resume
bit-identical; the shipped configs — tiny pixel models on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffdistill.trainers.scm import (
    SCMConfig,
    SCMTrainer,
    draw_t_hat,
    normalize_tangent,
    scm_loss,
    scm_tangent,
)
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config
from diffdistill.trigflow import TrigFlow

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def scm_data(model_dir, out, *, scm=None, train=None, log=None):
    return {
        "method": "scm", "output_dir": str(out), "seed": 1,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 16, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True, **(train or {})},
        "scm": dict(scm or {}),
        "log": {"every": 1, "progress": False, "tensorboard": False, **(log or {})},
    }


def scm_cfg(model_dir, out, **kw):
    return build_config(SCMConfig, scm_data(model_dir, out, **kw))


def built(model_dir, out, **kw) -> SCMTrainer:
    t = SCMTrainer(scm_cfg(model_dir, out, **kw))
    t.setup()
    return t


# ----------------------------------------------------------------------------- formulas


def test_proposal_is_atan_of_a_lognormal_over_sigma_d():
    """tan(t̂) = e^τ/σ_d, τ ~ N(P_mean, P_std²) (Sec. 4.3): the same normal draws by hand."""
    g = torch.Generator().manual_seed(3)
    got = draw_t_hat(1000, -1.0, 1.4, 0.5, generator=g)
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = [math.atan(math.exp(-1.0 + 1.4 * float(v)) / 0.5) for v in z]
    assert torch.allclose(got, torch.tensor(want, dtype=F64), rtol=0, atol=1e-14)
    # log(σ_d tan t̂) is the normal itself: its mean and std
    tau = (0.5 * torch.tan(got)).log()
    assert abs(float(tau.mean()) + 1.0) < 0.1 and abs(float(tau.std()) - 1.4) < 0.1
    clamped = draw_t_hat(1000, -1.0, 1.4, 0.5, generator=g, t_range=(0.2, 1.3))
    assert float(clamped.min()) == 0.2 and float(clamped.max()) == 1.3


def test_tangent_by_hand_at_pi_over_3():
    """g = −cos²(σ_d F⁻ − ẋ) − r (cos sin x + σ_d J) at t̂ = π/3 (cos ½, sin √3/2), one
    element: F⁻ = 2, ẋ = 0.5, x = 1, J = 0.4, σ_d = 0.5, r = 0.25."""
    t = torch.tensor([math.pi / 3], dtype=F64)
    one = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    g = scm_tangent(one(2.0), one(0.4), one(1.0), one(0.5), t, r=0.25, sigma_data=0.5)
    cs = 0.5 * math.sqrt(3) / 2
    want = -0.25 * (0.5 * 2.0 - 0.5) - 0.25 * (cs * 1.0 + 0.5 * 0.4)
    assert float(g) == pytest.approx(want, abs=1e-15)
    # normalisation: per sample, L2 or RMS, + c
    g2 = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    assert torch.allclose(normalize_tangent(g2, 0.1),
                          torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]], dtype=F64))
    rms = 5 / math.sqrt(2)
    assert torch.allclose(normalize_tangent(g2, 0.1, "rms")[0],
                          torch.tensor([3, 4], dtype=F64) / (rms + 0.1))


def test_adaptive_weighting_value_and_gradients_are_the_joint_loss():
    """L = λ e^{−w}/D ‖F − F⁻ − g‖² + w by hand, and the network / head split has the joint
    loss's gradients in F and in w."""
    f = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64, requires_grad=True)
    fm = torch.tensor([[0.5, 1.0], [0.5, 0.0]], dtype=F64)
    g = torch.tensor([[0.1, 0.2], [0.0, -0.5]], dtype=F64)
    w = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    lam = torch.tensor([2.0, 1.0], dtype=F64)
    value, net, head = scm_loss(f, fm, g, w, lam)
    mse = [((1 - 0.5 - 0.1) ** 2 + (2 - 1 - 0.2) ** 2) / 2, (0 + (-1 - 0 + 0.5) ** 2) / 2]
    want = [2.0 * math.exp(-0.3) * mse[0] + 0.3, 1.0 * math.exp(0.2) * mse[1] - 0.2]
    assert torch.allclose(value, torch.tensor(want, dtype=F64), atol=1e-15)
    gf, gw = torch.autograd.grad(value.sum(), (f, w), retain_graph=True)
    sf, sw = torch.autograd.grad((net + head).sum(), (f, w), retain_graph=True)
    assert torch.allclose(gf, sf, atol=1e-15) and torch.allclose(gw, sw, atol=1e-15)
    # each part carries only its own parameter's gradient
    nf, nw = torch.autograd.grad(net.sum(), (f, w), retain_graph=True, allow_unused=True)
    hf, hw = torch.autograd.grad(head.sum(), (f, w), retain_graph=True, allow_unused=True)
    assert nw is None and hf is None
    assert torch.allclose(nf, gf, atol=1e-15) and torch.allclose(hw, gw, atol=1e-15)


@pytest.mark.parametrize("method,tol", [("autograd", 1e-12), ("finite_difference", 1e-6)])
def test_the_trainers_tangent_on_a_hand_derivable_network(pixel_dir, tmp_path, method, tol):
    """F(x, t̂) = 0.3 x cos t̂ + 0.2 t̂ put in for the student and θ⁻: the trainer's F⁻ and g
    (JVP with tangents (cos·sin·ẋ, cos·sin), warm-up r at step 1 of 4, L2 normalisation)
    equal the hand derivative dF = 0.3 (ẋ cos t̂ − x sin t̂ τ) + 0.2 τ put in the formula."""
    t = built(pixel_dir, tmp_path, scm={"tangent_warmup_steps": 4, "jvp": method,
                                        "jvp_fd_eps": 1e-6})
    net = lambda x, th, cond=None: 0.3 * x * torch.cos(th).reshape(-1, 1, 1, 1) \
        + 0.2 * th.reshape(-1, 1, 1, 1)  # noqa: E731
    t.student_tf = t.target_tf = net
    gen = torch.Generator().manual_seed(0)
    x, xd = (torch.randn(2, 3, 4, 4, generator=gen, dtype=F64) for _ in range(2))
    th = torch.tensor([0.4, 1.3], dtype=F64)
    f, fm, g = t.tangent_terms(x, th, xd, None, seed=5, step=1)
    c, s = torch.cos(th).reshape(-1, 1, 1, 1), torch.sin(th).reshape(-1, 1, 1, 1)
    tau = c * s
    dF = 0.3 * (tau * xd * c - x * s * tau) + 0.2 * tau
    raw = -c**2 * (0.5 * net(x, th) - xd) - 0.25 * (c * s * x + 0.5 * dF)
    norm = raw.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    assert torch.allclose(fm, net(x, th)) and torch.allclose(f, net(x, th))
    assert torch.allclose(g, raw / (norm + 0.1), rtol=0, atol=tol)
    assert t.tangent_warmup(0) == 0.0 and t.tangent_warmup(2) == 0.5 and t.tangent_warmup(9) == 1


# ----------------------------------------------------------------------------- the step


def test_sct_step_is_the_scm_objective_reproduced_from_its_formulas(pixel_dir, tmp_path):
    """One sCT step's loss recomputed by hand from the trainer's generator state: the proposal,
    z = σ_d·noise, x_t̂ = cos x0 + sin z, ẋ = cos z − sin x0, the JVP's tangents, g written
    out, the prior weight 1/(σ_d tan t̂)."""
    t = built(pixel_dir, tmp_path, scm={"prior_weighting": True, "tangent_warmup_steps": 0})
    batch = next(t._batches())
    state = t.generator.get_state()
    terms = t.loss_terms(batch)
    t.generator.set_state(state)
    x0 = t.encode_x0(batch).float()
    cond = t.cond_for_batch(batch)
    n = x0.shape[0]
    tau = -1.0 + 1.4 * torch.randn(n, generator=t.generator, dtype=F64)
    th = torch.atan(tau.exp() / 0.5).clamp(*t.t_range)
    z = 0.5 * torch.randn(*x0.shape, generator=t.generator)
    c, s = (v.reshape(-1, 1, 1, 1).float() for v in (torch.cos(th), torch.sin(th)))
    x = c * x0 + s * z
    xd = c * z - s * x0
    cs = torch.cos(th) * torch.sin(th)
    # dF⁻ along (cos sin ẋ, cos sin) with torch.func.jvp itself (diffdistill.jvp is tested
    # on its own; finite differences are too coarse here: the t̂-derivative of a diffusers
    # time embedding is steep, ~290 timesteps per radian at t̂ = 1.2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        F, J = torch.func.jvp(lambda a, b: t.target_tf(a, b, cond), (x, th),
                              (cs.reshape(-1, 1, 1, 1).float() * xd, cs))
    F, J = F.double(), J.double()
    cd, sd = (v.reshape(-1, 1, 1, 1) for v in (torch.cos(th), torch.sin(th)))
    g = -cd**2 * (0.5 * F - xd.double()) - (cd * sd * x.double() + 0.5 * J)
    g = g / (g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 0.1)
    # the normalised tangent itself, element by element
    assert float((terms["g"].double() - g).norm() / g.norm()) < 1e-5
    assert torch.allclose(terms["f_minus"].double(), F, atol=1e-6)
    mse = g.pow(2).flatten(1).mean(dim=1)  # F_θ − F⁻ = 0: same weights, same mask
    lam = 1 / (0.5 * torch.tan(th))
    want = (lam * mse).mean()  # w = 0 at the start (zero-initialised head)
    assert float(terms["logvar"]) == 0.0
    assert float(terms["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    # r = 0 (warm-up at its start) drops the JVP term: a different tangent
    t.cfg.scm.tangent_warmup_steps = 10
    t.generator.set_state(state)
    g0 = t.loss_terms(batch)["g"].double()
    assert float((g0 - g).norm() / g.norm()) > 0.05


def test_scd_velocity_is_the_guided_teachers_and_the_student_starts_as_the_teacher(
        pixel_dir, tmp_path):
    t = built(pixel_dir, tmp_path, scm={"mode": "cd", "guidance_scale": 3.0})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    th = torch.tensor([0.5, 1.2], dtype=F64)
    cond = t.backbone.class_cond([2, 5], guidance=True)
    teacher = TrigFlow(t.backbone.denoiser(), 0.5)
    teacher.denoiser.unet = t.teacher_tf.denoiser.unet
    with torch.no_grad():
        v = t.velocity(None, None, x, th, cond)
        vc = teacher.velocity(x, th, cond.replace(uncond=None))
        vu = teacher.velocity(x, th, cond.uncond)
        f_student = t.student_tf(x, th, cond.replace(uncond=None))
    assert torch.allclose(v, vu + 3.0 * (vc - vu), atol=1e-5)
    assert (vc - vu).abs().max() > 1e-3
    assert torch.allclose(f_student * 0.5, vc, atol=1e-5)  # pretrained: F_student = F_teacher
    assert t.teacher_tf.denoiser.unet is not t.unwrap(t.unet)
    assert not any(p.requires_grad for p in t.teacher_tf.denoiser.unet.parameters())


def test_sampler_grids_are_t_max_and_the_native_time_of_1_1(pixel_dir, tmp_path):
    t = built(pixel_dir, tmp_path, log={"grid_size": 2})
    sched = t.backbone.schedule
    one, two = t.sample_timesteps(1), t.sample_timesteps(2)
    assert one.tolist() == [999.0] and two[0] == 999.0
    mid = int(two[1])
    # σ_ve = σ_d tan(1.1) lies between the table's σ at mid ± 1 (rounded native time)
    target = 0.5 * math.tan(1.1)
    assert float(sched.sigma_of_t(mid - 1)) < target < float(sched.sigma_of_t(mid + 1))
    images = t.sample_images([0, 1])
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8


def test_bad_configs_are_refused_in_one_line(pixel_dir, tmp_path):
    for scm, train_kw, key in [
            ({"mode": "ct", "teacher": "some/teacher"}, {}, "scm.teacher: sCT"),
            ({"mode": "ct", "guidance_scale": 2.0}, {}, "no teacher to guide"),
            ({"mode": "cd", "init": "scratch"}, {}, "scm.init=scratch with scm.mode=cd"),
            ({"mode": "cd", "teacher": "elsewhere"}, {}, "separate teacher folder"),
            ({"student_prediction": "v_prediction"}, {}, "scm.student_prediction"),
            ({"sigma_data": 0.0}, {}, "scm.sigma_data"), ({"p_std": 0.0}, {}, "scm.p_std"),
            ({"tangent_warmup_steps": -1}, {}, "scm.tangent_warmup_steps"),
            ({"tangent_norm_c": 0.0}, {}, "scm.tangent_norm_c"),
            ({"jvp": "forward"}, {}, "scm.jvp="), ({"jvp_fd_eps": 0.0}, {}, "scm.jvp_fd_eps"),
            ({"two_step_t_hat": 1.6}, {}, "scm.two_step_t_hat"),
            ({"mode": "cd", "guidance_scale": 0.5}, {}, "scm.guidance_scale"),
            ({"mode": "dc"}, {}, "scm.mode"), ({"export_steps": 4}, {}, "scm.export_steps"),
            ({}, {"compile": True}, "train.compile=true with method scm")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")) as e:
            scm_cfg(pixel_dir, tmp_path, scm=scm, train=train_kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.kind='prompts'") as e:
        build_config(SCMConfig, {**scm_data(pixel_dir, tmp_path),
                                 "data": {"kind": "prompts", "path": "p.txt"}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="adapter.type=lora"):
        build_config(SCMConfig, {**scm_data(pixel_dir, tmp_path, scm={"init": "scratch"}),
                                 "adapter": {"type": "lora", "rank": 4}})


# ----------------------------------------------------------------------------- runs


def test_lora_scd_on_a_latent_cross_attention_teacher_trains(sd_dir, tmp_path):
    """sCD with a LoRA student on an SD-structured latent teacher: the teacher pass is the same
    UNet with its LoRA disabled, the JVP runs through cross-attention (math SDPA), only the
    LoRA and the weight head change."""
    data = scm_data(sd_dir, tmp_path, scm={"mode": "cd", "guidance_scale": 2.0,
                                           "tangent_warmup_steps": 0},
                    train={"max_steps": 2, "lr": 1e-2})
    data["data"]["resolution"] = 32
    data["adapter"] = {"type": "lora", "rank": 4}
    t = SCMTrainer(build_config(SCMConfig, data))
    last = t.fit()
    assert math.isfinite(last["loss"]) and last["g_rms"] > 0
    raw = t.unwrap(t.unet)
    assert t.teacher_tf.denoiser.unet is raw  # one UNet: the teacher is it without the LoRA
    trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    # LoRA's B starts at zero: after two steps it is not (the student moved off the teacher)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in raw.named_parameters()
               if "lora_B" in n)
    head = t.unwrap(t.logvar)
    assert float(head.linear.weight.detach().abs().sum()) > 0  # the weight head was updated


def _rows(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = {k: v for k, v in r.items() if k != "it_per_s"}
    return rows


def _same_checkpoints(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    opts = sorted(p.name for p in a.glob("optimizer*.bin"))
    assert len(opts) == 2  # the network's and the weight head's
    for name in opts:
        sa = torch.load(a / name, map_location="cpu", weights_only=True)["state"]
        sb = torch.load(b / name, map_location="cpu", weights_only=True)["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
                   for i in sa for k in sa[i]), name


@pytest.mark.parametrize("mode", ["cd"])  # sCD: teacher, guidance, EMA; sCT shares the rest
def test_sigkill_then_resume_latest_is_bit_identical(pixel_dir, tmp_path, mode):
    """Killed with SIGKILL after checkpoint 3 of 8 (a separate process), resumed with
    ``diffdistill train CFG --resume latest``: the final checkpoint (weights, EMA, weight head,
    RNG, both optimizers) and every logged row equal an uninterrupted run's."""
    from helpers import sigkill_and_resume

    scm = {"mode": mode, "tangent_warmup_steps": 4}
    if mode == "cd":
        scm["guidance_scale"] = 2.0
    else:
        scm.update(init="scratch", student_prediction="v_prediction")

    def run_data(out):
        data = scm_data(pixel_dir, out, scm=scm,
                        train={"max_steps": 8, "checkpoint_every": 1, "keep_checkpoints": 2,
                               "ema_decay": 0.9})
        return data

    a, b = sigkill_and_resume(run_data, tmp_path, kill_after=3, total=8)
    out, ref = tmp_path / "crash", tmp_path / "ref"
    _same_checkpoints(a, b)
    rows = _rows(ref)
    assert _rows(out) == rows and sorted(rows) == list(range(1, 9))
    # the tangent warm-up r = step/4 went on across the crash
    assert [rows[k]["tangent_warmup"] for k in range(1, 9)] == [0, .25, .5, .75, 1, 1, 1, 1]


@pytest.mark.parametrize("name", ["toy_ct", "toy"])
def test_shipped_configs_run_a_few_steps(name, pixel_dir, tmp_path):
    from diffdistill.trainers import load_run_config

    out = tmp_path / name
    cls, cfg = load_run_config(ROOT / "configs" / "scm" / f"{name}.yaml", [
        f"model.path={pixel_dir}", f"output_dir={out}", "data.resolution=16", "data.limit=8",
        "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=0",
        "train.cpu=true", "log.grid_every=3", "log.grid_size=2", "log.progress=false",
        "log.tensorboard=false"])
    assert cls is SCMTrainer
    c = cfg.scm
    assert (c.sigma_data, c.tangent_norm_c, c.two_step_t_hat) == (0.5, 0.1, 1.1)
    if name == "toy_ct":
        assert (c.mode, c.init, c.p_mean, c.p_std) == ("ct", "scratch", -1.0, 1.4)
    else:
        assert (c.mode, c.init, c.p_mean, c.p_std) == ("cd", "pretrained", -0.8, 1.6)
        assert c.guidance_scale > 1
    last = cls(cfg).fit()
    assert math.isfinite(last["loss"]) and last["g_rms"] > 0
    assert list((out / "samples").glob("*.png"))


# ----------------------------------------------------------------------------- exports


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _by_hand(export, labels, seeds, timesteps):
    """The exported UNet2DModel stepped by the exported stock LCMScheduler."""
    from diffusers import LCMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(export), subfolder="unet").eval()
    sched = LCMScheduler.from_pretrained(str(export), subfolder="scheduler")
    outs = []
    for label, seed in zip(labels, seeds):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((1, 3, 16, 16), generator=g)
        sched.set_timesteps(timesteps=timesteps)
        with torch.no_grad():
            for t in sched.timesteps:
                out = unet(x, t, class_labels=torch.tensor([label])).sample
                x = sched.step(out, t, x, generator=g).prev_sample
        outs.append(x)
    return torch.cat(outs)


def test_pixel_export_is_the_stock_scheduler_reproducing_the_trainers_samples(
        pixel_dir, tmp_path, monkeypatch):
    """sCD's student exported (full): the stock UNet2DModel + LCMScheduler at the native grid
    [999] / [999, t(1.1)] reproduce the trainer's own 1- and 2-step samples (1e-4, as DMD2's
    exports), and the model card's code, run as written, gives its 2-step image."""
    from diffdistill.export import card_code

    t = SCMTrainer(scm_cfg(pixel_dir, tmp_path / "run", scm={"mode": "cd",
                                                             "guidance_scale": 2.0},
                           train={"lr": 1e-2}))
    t.fit()
    export = tmp_path / "run" / "export"
    info = json.loads((export / "diffdistill_export.json").read_text())
    two = [int(v) for v in t.sample_timesteps(2).tolist()]
    assert info["sampler"] == "lcm" and info["steps"] == 2 and info["timesteps"] == two
    assert info["timesteps_by_steps"] == {"1": [999]}
    labels = [3, 7]
    cond = t.backbone.class_cond(torch.tensor(labels), guidance=False)
    for steps in (1, 2):
        ours = t.sample_latents([1, 2], cond, steps)
        stock = _by_hand(export, labels, [1, 2], t.sample_timesteps(steps).long().tolist())
        assert _rel(stock, ours) < 1e-4 and float(ours.std()) > 0.1, steps
    # the student moved off the teacher: its samples are not the teacher's
    from diffdistill.backbone import load_backbone

    teacher = load_backbone(str(pixel_dir)).unet.state_dict()
    moved = t.unwrap(t.unet).state_dict()
    assert any(not torch.equal(moved[k], teacher[k]) for k in teacher)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(card_code(export / "README.md"), scope)
    mine = t.sample_latents([0], t.backbone.class_cond(torch.tensor([0]), guidance=False), 2)
    expected = ((mine.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert (scope["image"].int() - expected.int()).abs().max() <= 1


def test_lora_export_loads_in_the_teachers_stock_pipeline(sd_dir, tmp_path, monkeypatch):
    """A LoRA sCD student on an SD-structured teacher: the diffusers and kohya LoRA files load
    into the teacher's stock StableDiffusionPipeline, whose LCMScheduler called with the
    student's timesteps reproduces the trainer's 1- and 2-step samples; the card's code runs."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from helpers import run_model_card_code

    from diffdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    data = scm_data(sd_dir, tmp_path / "run", scm={"mode": "cd", "guidance_scale": 2.0,
                                                   "tangent_warmup_steps": 0},
                    train={"lr": 1e-2})
    data["data"]["resolution"] = 32
    data["adapter"] = {"type": "lora", "rank": 4}
    t = SCMTrainer(build_config(SCMConfig, data))
    t.fit()
    export = tmp_path / "run" / "export"
    prompts = ["a photo of a bag", "a photo of a sneaker"]
    cond = t.backbone.encode_prompts(prompts, with_uncond=False)
    for weight in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
        pipe.load_lora_weights(str(export), weight_name=weight)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        for steps in (1, 2):
            ts = t.sample_timesteps(steps).long().tolist()
            gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
            with torch.no_grad():
                stock = pipe(prompts, timesteps=ts, guidance_scale=1.0, height=32, width=32,
                             generator=gens, output_type="latent").images
            ours = t.sample_latents([5, 6], cond, steps)
            assert _rel(stock, ours) < 1e-4 and float(ours.std()) > 0.1, (weight, steps)
    card = (export / "README.md").read_text()
    assert "timesteps=" in card and "LCMScheduler" in card
    run_model_card_code(export, tmp_path, monkeypatch)


def test_flow_teacher_config_trains_and_exports_to_the_stock_sd3_pipeline(sd3_dir, tmp_path,
                                                                          monkeypatch):
    """configs/scm/toy_flow.yaml on the tiny SD3-structured flow teacher: 3 sCD steps (the θ⁻
    JVP through the MMDiT), grids σ = [1] / [1, t(1.1)/T]; the exported pipeline with the
    card's FlowMatchEuler (shift 1, stochastic) called with those sigmas reproduces the
    trainer's 1- and 2-step samples; the card's code runs."""
    from diffdistill.trainers import load_run_config
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from helpers import run_model_card_code

    out = tmp_path / "run"
    cls, cfg = load_run_config(ROOT / "configs" / "scm" / "toy_flow.yaml", [
        f"model.path={sd3_dir}", f"output_dir={out}", "data.limit=8", "train.max_steps=3",
        "train.batch_size=2", "train.checkpoint_every=0", "train.cpu=true",
        "scm.tangent_warmup_steps=1", "log.grid_every=0", "log.progress=false",
        "log.tensorboard=false"])
    t = cls(cfg)
    last = t.fit()
    assert math.isfinite(last["loss"]) and last["g_rms"] > 0
    mid = float(t.sample_timesteps(2)[1])
    assert t.sample_timesteps(1).tolist() == [1000.0] and mid == 496.0  # σ_d tan(1.1) = σ/(1−σ)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "export"), text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True)
    prompts = ["a photo of a bag", "a photo of a sneaker"]
    cond = t.backbone.encode_prompts(prompts, with_uncond=False)
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as flow_sched

    for steps, sigmas in ((1, [1.0]), (2, [1.0, mid / 1000])):
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        # the stock SD3 pipeline does not hand its generators to the scheduler's step, whose
        # re-noising then draws from the global RNG: replay each sample's next draw instead
        monkeypatch.setattr(flow_sched, "randn_tensor", lambda shape, gens=gens, **kw: torch.cat(
            [torch.randn((1, *shape[1:]), generator=g) for g in gens]))
        with torch.no_grad():
            stock = pipe(prompts, sigmas=sigmas, guidance_scale=1.0, generator=gens,
                         output_type="latent", height=32, width=32).images
        ours = t.sample_latents([3, 4], cond, steps)
        assert _rel(stock, ours) < 1e-4 and float(ours.std()) > 0.1, steps
    monkeypatch.undo()
    assert "sigmas=[1.0, 0.496]" in (out / "export" / "README.md").read_text()
    run_model_card_code(out / "export", tmp_path, monkeypatch)
