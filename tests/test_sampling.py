import math

import pytest
import torch

from diffdistill.denoiser import Cond, Denoiser, DenoiserBase, LCMConsistency, Prediction
from diffdistill.sampling import (
    SAMPLERS,
    cm_timesteps,
    ddim_timesteps,
    default_timesteps,
    generate,
    initial_sample,
    karras_timesteps,
    lcm_timesteps,
    sample_ddim,
    sample_euler,
    sample_heun,
    sample_lcm,
    sample_onestep,
    sample_tcd,
    seeded_noise,
    tcd_timesteps,
    to_uint8,
)
from diffdistill.schedule import VESchedule, VPSchedule, karras_sigmas
from diffdistill.tiny import SD_SCHEDULER, tiny_cond_unet, tiny_pixel_unet

LATENT = (4, 16, 16)


@pytest.fixture(scope="module")
def unet():
    return tiny_cond_unet().eval()


@pytest.fixture(scope="module")
def ehs():
    return torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(123))


def _stock_loop(scheduler, unet, cond_kwargs, seed, shape=(1,) + LATENT, scale_input=False,
                **step_kw):
    """Hand-run stock diffusers loop: one generator for the initial noise and every step."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(sample, t) if scale_input else sample
        out = unet(inp, t, **cond_kwargs).sample
        sample = scheduler.step(out, t, sample, generator=g, **step_kw).prev_sample
    return sample


def _max_err(ours, ref):
    """Largest error relative to the image scale: a random tiny UNet's x0 reaches |x| ~ 20
    (x0 = (x - sigma eps)/alpha with alpha(999) = 0.068), where a float32 ulp is ~2e-6."""
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _ours(sampler, model, timesteps, cond, seed, shape=LATENT, **opts):
    noise, gens = seeded_noise([seed], shape)
    x = initial_sample(model.schedule, noise, timesteps[0])
    return sampler(model, x, timesteps, cond, generators=gens, **opts)


# ----------------------------------------------------------------------------- stock equality


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_lcm_equals_stock_lcm_scheduler(unet, ehs, prediction_type, num_steps):
    from diffusers import LCMScheduler

    stock = LCMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    stock.set_timesteps(num_steps, original_inference_steps=50)
    sched = VPSchedule.from_config(SD_SCHEDULER)
    model = LCMConsistency(Denoiser(unet, sched, prediction_type))
    cond = Cond(encoder_hidden_states=ehs[:1])
    seen = []
    with torch.no_grad():
        ref = _stock_loop(stock, unet, cond.unet_kwargs(), seed=7)
        ours = _ours(sample_lcm, model, lcm_timesteps(num_steps), cond, seed=7,
                     callback=lambda i, t, x, x0: seen.append(t))
    assert seen == stock.timesteps.tolist()
    assert ours.dtype == torch.float32
    assert _max_err(ours, ref) <= 1e-5
    assert ref.abs().mean() > 0.1  # a real image, not a degenerate zero


def test_lcm_single_generator_matches_stock_batch(unet, ehs):
    """A lone torch.Generator (not a list) draws the whole batch, exactly like a stock loop."""
    from diffusers import LCMScheduler

    stock = LCMScheduler(**SD_SCHEDULER)
    stock.set_timesteps(4, original_inference_steps=50)
    model = LCMConsistency(Denoiser(unet, VPSchedule.from_config(SD_SCHEDULER)))
    cond = Cond(encoder_hidden_states=ehs[:3])
    with torch.no_grad():
        ref = _stock_loop(stock, unet, cond.unet_kwargs(), seed=8, shape=(3,) + LATENT)
        g = torch.Generator().manual_seed(8)
        x = torch.randn((3,) + LATENT, generator=g)
        ours = sample_lcm(model, x, lcm_timesteps(4), cond, generators=g)
    assert _max_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps,eta", [(2, 0.0), (5, 0.0), (5, 0.5)])
def test_ddim_equals_stock_ddim_scheduler(unet, ehs, prediction_type, num_steps, eta):
    from diffusers import DDIMScheduler

    stock = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    stock.set_timesteps(num_steps)
    model = Denoiser(unet, VPSchedule.from_config(SD_SCHEDULER), prediction_type)
    cond = Cond(encoder_hidden_states=ehs[1:2])
    ts = default_timesteps("ddim", model.schedule, num_steps)
    assert torch.equal(ts, stock.timesteps)
    with torch.no_grad():
        ref = _stock_loop(stock, unet, cond.unet_kwargs(), seed=3, eta=eta)
        ours = _ours(sample_ddim, model, ts, cond, seed=3, eta=eta)
    assert _max_err(ours, ref) <= 1e-5


def test_ddim_trailing_grid_and_set_alpha_to_one(unet, ehs):
    from diffusers import DDIMScheduler

    cfg = {**SD_SCHEDULER, "timestep_spacing": "trailing", "set_alpha_to_one": True,
           "steps_offset": 0}
    stock = DDIMScheduler(**cfg)
    stock.set_timesteps(4)
    model = Denoiser(unet, VPSchedule.from_config(cfg))
    cond = Cond(encoder_hidden_states=ehs[2:3])
    ts = default_timesteps("ddim", model.schedule, 4)
    assert ts.tolist() == [999, 749, 499, 249] == stock.timesteps.tolist()
    with torch.no_grad():
        ref = _stock_loop(stock, unet, cond.unet_kwargs(), seed=4)
        ours = _ours(sample_ddim, model, ts, cond, seed=4)
        # with alpha_final = 1 the last step lands exactly on x0_hat
        x0_last = []
        _ours(sample_ddim, model, ts, cond, seed=4,
              callback=lambda i, t, x, x0: x0_last.append(x0))
    assert _max_err(ours, ref) <= 1e-5
    assert torch.allclose(ours, x0_last[-1], atol=1e-6)


@pytest.mark.parametrize("gamma", [0.3, 0.0])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_tcd_equals_stock_tcd_scheduler(unet, ehs, gamma, num_steps):
    from diffusers import TCDScheduler

    stock = TCDScheduler(**SD_SCHEDULER)
    stock.set_timesteps(num_steps)
    model = Denoiser(unet, VPSchedule.from_config(SD_SCHEDULER))
    cond = Cond(encoder_hidden_states=ehs[3:4])
    with torch.no_grad():
        ref = _stock_loop(stock, unet, cond.unet_kwargs(), seed=11, eta=gamma)
        ours = _ours(sample_tcd, model, tcd_timesteps(num_steps), cond, seed=11, gamma=gamma)
    assert _max_err(ours, ref) <= 1e-5


def test_tcd_gamma_zero_is_ddim_on_the_same_grid(unet, ehs):
    """γ = 0: s = t_prev, no noise, last step to t = 0 — DDIM with alphas_cumprod_final = ᾱ₀."""
    cfg = dict(SD_SCHEDULER, set_alpha_to_one=False)
    model = Denoiser(unet, VPSchedule.from_config(cfg))
    cond = Cond(encoder_hidden_states=ehs[:2])
    x = torch.randn((2,) + LATENT, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([999, 499])
    with torch.no_grad():
        tcd = sample_tcd(model, x, ts, cond, gamma=0.0)
        # DDIM's last step lands at alphas_cumprod[0] (set_alpha_to_one=False), as TCD's at t=0
        ddim = sample_ddim(model, x, ts, cond)
    assert torch.allclose(tcd, ddim, atol=1e-6)


@pytest.mark.parametrize("num_steps,clip", [(1, False), (2, False), (3, True)])
def test_cm_multistep_equals_stock_cm_scheduler(num_steps, clip):
    from diffusers import CMStochasticIterativeScheduler

    unet = tiny_pixel_unet(num_classes=None).eval()
    stock = CMStochasticIterativeScheduler(clip_denoised=clip)
    stock.set_timesteps(num_steps)
    model = Denoiser(unet, VESchedule(0.002, 80.0), "cm")
    ts = default_timesteps("lcm", model.schedule, num_steps)
    assert torch.allclose(ts.float(), stock.sigmas[:-1], rtol=1e-6)
    with torch.no_grad():
        ref = _stock_loop(stock, unet, {}, seed=5, shape=(1, 3, 16, 16), scale_input=True)
        ours = _ours(SAMPLERS["cm"], model, ts, None, seed=5, shape=(3, 16, 16),
                     clip_denoised=clip)
    assert _max_err(ours, ref) <= 1e-4
    if clip:
        assert ours.abs().max() <= 1.0


def test_onestep_pixel_cfg_equals_hand_formula():
    unet = tiny_pixel_unet(num_classes=10).eval()
    sched = VPSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    model = Denoiser(unet, sched, "epsilon")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    labels, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    cond = Cond(class_labels=labels, uncond=Cond(class_labels=null))
    with torch.no_grad():
        ours = sample_onestep(model, x, torch.tensor([999]), cond, guidance_scale=2.0)
        t = torch.tensor([999, 999])
        eps_c = unet(x, t, class_labels=labels).sample
        eps_u = unet(x, t, class_labels=null).sample
    eps = eps_u + 2.0 * (eps_c - eps_u)
    acp = float(sched.alphas_cumprod[999])
    x0 = (x - math.sqrt(1 - acp) * eps) / math.sqrt(acp)
    assert _max_err(ours, x0) <= 1e-5
    assert not torch.allclose(eps_c, eps_u)  # guidance actually did something


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("orig", [50, 100])
def test_lcm_and_tcd_grids_equal_stock(n, orig):
    from diffusers import LCMScheduler, TCDScheduler

    s = LCMScheduler()
    s.set_timesteps(n, original_inference_steps=orig)
    assert torch.equal(lcm_timesteps(n, orig), s.timesteps)
    s = TCDScheduler(original_inference_steps=orig)
    s.set_timesteps(n)
    assert torch.equal(tcd_timesteps(n, orig), s.timesteps)
    # stock TCD uses the full-T grid once original_inference_steps is passed to set_timesteps
    s.set_timesteps(n, original_inference_steps=orig)
    assert torch.equal(tcd_timesteps(n, None), s.timesteps)
    s = TCDScheduler()
    s.set_timesteps(n, strength=0.6)
    assert torch.equal(tcd_timesteps(n, strength=0.6), s.timesteps)


def test_tcd_grid_values():
    assert tcd_timesteps(1).tolist() == [999]
    assert tcd_timesteps(2).tolist() == [999, 499]
    assert tcd_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_grids_equal_stock(spacing, offset):
    from diffusers import DDIMScheduler

    for n in [1, 2, 3, 5, 7, 25, 50]:
        s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(n)
        assert torch.equal(ddim_timesteps(n, spacing, offset), s.timesteps), (spacing, n)


@pytest.mark.parametrize("n", [2, 5, 10, 30])
def test_karras_grid_equals_stock_euler_karras(n):
    from diffusers import EulerDiscreteScheduler

    cfg = {k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    # "linspace" spacing makes stock's Karras range the full [sigma(0), sigma(T-1)]
    s = EulerDiscreteScheduler(**dict(cfg, timestep_spacing="linspace"), use_karras_sigmas=True)
    s.set_timesteps(n)
    vp = VPSchedule.from_config(SD_SCHEDULER)
    ts = karras_timesteps(vp, n)
    assert torch.allclose(ts, s.timesteps.double(), atol=1e-4)
    assert torch.allclose(vp.sigma_of_t(ts), s.sigmas[:-1].double(), rtol=1e-5)
    assert float(s.sigmas[-1]) == 0.0  # the final 0 the samplers append themselves
    ve = VESchedule(0.002, 80.0)
    assert torch.allclose(karras_timesteps(ve, n), karras_sigmas(n, 0.002, 80.0))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
def test_cm_grid_equals_stock(n):
    from diffusers import CMStochasticIterativeScheduler

    s = CMStochasticIterativeScheduler()
    s.set_timesteps(n)
    assert torch.allclose(cm_timesteps(n).float(), s.sigmas[:-1], rtol=1e-6)


def test_default_timesteps_pick_the_right_grid():
    vp = VPSchedule.from_config(SD_SCHEDULER)
    ve = VESchedule(0.002, 80.0)
    assert default_timesteps("onestep", vp, 1).tolist() == [999.0]
    assert default_timesteps("onestep", vp, 4).tolist() == [999.0]  # always a single step
    assert default_timesteps("onestep", ve, 1).tolist() == [80.0]
    assert torch.equal(default_timesteps("lcm", vp, 4), lcm_timesteps(4))
    assert torch.equal(default_timesteps("tcd", vp, 4), tcd_timesteps(4))
    assert torch.equal(default_timesteps("ddim", vp, 5), ddim_timesteps(5, "leading", 1))
    assert torch.equal(default_timesteps("lcm", ve, 3), cm_timesteps(3))
    assert torch.equal(default_timesteps("heun", ve, 7), karras_timesteps(ve, 7))
    with pytest.raises(ValueError, match="VP"):
        default_timesteps("tcd", ve, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        default_timesteps("dpm", vp, 2)
    assert set(SAMPLERS) >= {"onestep", "lcm", "tcd", "ddim", "euler", "heun"}


# ----------------------------------------------------------------------------- analytic ODE


class GaussianDenoiser(DenoiserBase):
    """Exact posterior mean for data ~ N(mu, s^2) per dimension (x is (N, D))."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        alpha, sigma_t = self.schedule.alpha_sigma(t)
        a = alpha.to(x.dtype).reshape(-1, 1)
        sig = (sigma_t / alpha).to(x.dtype).reshape(-1, 1)  # VE-equivalent sigma
        x_ve = x / a
        mu, s2 = self.mu.to(x.dtype), self.s.to(x.dtype) ** 2
        x0 = mu + s2 / (s2 + sig**2) * (x_ve - mu)
        return Prediction(x0, (x_ve - x0) / sig)


MU = torch.tensor([0.5, -0.3, 0.2, 0.0])
STD = torch.tensor([0.7, 0.5, 1.0, 0.3])
SCHEDULES = {"vp": VPSchedule.from_config(SD_SCHEDULER), "ve": VESchedule(0.002, 80.0)}


def _exact_ode(schedule, ts, x_native):
    """PF-ODE solution: dy/dσ = y σ/(s²+σ²) for y = x_ve − μ  ⇒  y ∝ sqrt(s² + σ²).

    Karras' samplers end with an Euler step from the last grid sigma to 0, i.e. x0 = D(x;
    σ_last); for VP teachers σ_last = sigma(t=0) = 0.029 does not shrink with the step count,
    so the reference solves exactly down to σ_last and then applies D.
    """
    def sigma(t):
        alpha, sig = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        return float(sig / alpha), float(alpha)

    sigma_max, alpha_max = sigma(ts[0])
    sigma_last, _ = sigma(ts[-1])
    y_max = x_native / alpha_max - MU.double()
    s2 = STD.double() ** 2
    y_last = y_max * torch.sqrt((s2 + sigma_last**2) / (s2 + sigma_max**2))
    return MU.double() + s2 / (s2 + sigma_last**2) * y_last


@pytest.mark.parametrize("kind", ["vp", "ve"])
# Karras grids from sigma_max = 80 (VE) need ~100 Euler / ~30 Heun steps for 2% on the std
@pytest.mark.parametrize("sampler,steps", [(sample_euler, 100), (sample_heun, 32)])
def test_euler_heun_reach_gaussian_data_statistics(kind, sampler, steps):
    schedule = SCHEDULES[kind]
    model = GaussianDenoiser(schedule, MU, STD)
    ts = karras_timesteps(schedule, steps)
    noise = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    out = sampler(model, initial_sample(schedule, noise, ts[0]), ts)
    assert out.dtype == torch.float32
    assert (out.mean(0) - MU).abs().max() < 0.05
    assert (out.std(0) - STD).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_heun_matches_closed_form_ode_solution(kind):
    schedule = SCHEDULES[kind]
    model = GaussianDenoiser(schedule, MU, STD)
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def err(sampler, n):
        ts = karras_timesteps(schedule, n)
        x = initial_sample(schedule, noise, ts[0])
        return float((sampler(model, x, ts) - _exact_ode(schedule, ts, x)).abs().max())

    assert err(sample_heun, 256) < 1e-3  # |x_T| reaches 80·3 on VE: that is 4e-6 relative
    # orders of convergence: Heun ~ h^2 (error / 4 per doubling), Euler ~ h (/ 2)
    heun_64 = err(sample_heun, 64)
    assert 3.5 < heun_64 / err(sample_heun, 128) < 4.5
    euler_128 = err(sample_euler, 128)
    assert 1.8 < err(sample_euler, 64) / euler_128 < 2.2
    assert heun_64 < euler_128 / 5  # at about the same number of network calls


def test_ddim_eta0_is_euler_in_ve_sigma():
    """DDIM (eta 0) is the exact Euler step of the ODE in x/alpha over sigma (Song et al. 2021,
    Sec. 4.3), so both samplers agree on the same grid when it ends at alpha_final = 1."""
    schedule = VPSchedule.from_config(dict(SD_SCHEDULER, set_alpha_to_one=True))
    model = GaussianDenoiser(schedule, MU, STD)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = ddim_timesteps(10, "trailing", 0)
    assert torch.allclose(sample_ddim(model, x, ts), sample_euler(model, x, ts), atol=1e-10)


# ----------------------------------------------------------------------------- generation


def _lcm_model(unet):
    return LCMConsistency(Denoiser(unet, VPSchedule.from_config(SD_SCHEDULER)))


@pytest.mark.parametrize("sampler,opts", [("lcm", {}), ("tcd", {"gamma": 0.3})])
def test_generate_is_batch_size_invariant(unet, ehs, sampler, opts):
    model = _lcm_model(unet) if sampler == "lcm" else Denoiser(
        unet, VPSchedule.from_config(SD_SCHEDULER))
    seeds = [10, 11, 12, 13, 14, 15, 16, 17]
    outs = [generate(model, seeds=seeds, shape=LATENT,
                     cond_fn=lambda sl: Cond(encoder_hidden_states=ehs[sl]),
                     sampler=sampler, num_steps=4, batch_size=bs, output="latents",
                     progress=False, sampler_opts=opts) for bs in (1, 3, 8)]
    assert outs[0].shape == (8,) + LATENT
    # CPU conv kernels are not bitwise batch-invariant; the samplers' arithmetic and noise are
    for o in outs[1:]:
        assert _max_err(o, outs[0]) <= 1e-5
    # a sample is its seed's image: the same as generating it alone through the sampler
    cond = Cond(encoder_hidden_states=ehs[5:6])
    with torch.no_grad():
        alone = _ours(SAMPLERS[sampler], model, default_timesteps(sampler, model.schedule, 4),
                      cond, seed=15, **opts)
    assert _max_err(alone[0], outs[0][5]) <= 1e-5
    assert (outs[0][0] - outs[0][1]).abs().mean() > 0.1  # different seeds, different images


def test_generate_decode_and_outputs(unet, ehs):
    model = _lcm_model(unet)
    model.train()
    kw = {"seeds": [1, 2, 3], "shape": LATENT, "num_steps": 2, "batch_size": 2, "progress": False,
          "cond_fn": lambda sl: Cond(encoder_hidden_states=ehs[sl])}
    lat = generate(model, output="latents", **kw)

    def decode(z):
        return torch.tanh(2 * z[:, :3])

    img = generate(model, decode=decode, output="float", **kw)
    u8 = generate(model, decode=decode, output="uint8", **kw)
    assert model.training  # mode restored
    assert torch.allclose(img, decode(lat), atol=1e-6)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 16, 16)
    assert torch.equal(u8, to_uint8(decode(lat)))


def test_generate_guidance_uses_per_sample_uncond():
    unet = tiny_pixel_unet(num_classes=10).eval()
    model = Denoiser(unet, VPSchedule.from_config({"beta_schedule": "linear"}))
    labels = torch.tensor([1, 4, 9])

    def cond_fn(sl):
        c = labels[sl]
        return Cond(class_labels=c, uncond=Cond(class_labels=torch.full_like(c, 10)))

    out = generate(model, seeds=[0, 1, 2], shape=(3, 16, 16), cond_fn=cond_fn, sampler="onestep",
                   num_steps=1, guidance_scale=2.0, batch_size=2, output="float", progress=False)
    noise, _ = seeded_noise([0, 1, 2], (3, 16, 16))
    with torch.no_grad():
        ref = sample_onestep(model, noise, torch.tensor([999]), cond_fn(slice(0, 3)),
                             guidance_scale=2.0)
    assert _max_err(out, ref) <= 1e-5


def test_seeded_noise_is_the_first_draw_of_each_seed():
    noise, gens = seeded_noise([5, 9, 5], (2, 3))
    assert torch.equal(noise[0], torch.randn(2, 3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    # the generators continue after the initial draw (the samplers' step noise)
    g = torch.Generator().manual_seed(9)
    torch.randn(2, 3, generator=g)
    assert torch.equal(torch.randn(4, generator=gens[1]), torch.randn(4, generator=g))


def test_to_uint8_known_values():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]).reshape(1, 2, 2, 2)
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    assert to_uint8(x).dtype == torch.uint8 and to_uint8(x).shape == (1, 2, 2, 2)
    # 127.5 rounds half-to-even to 128; -0.5 -> 63.75 -> 64
    assert to_uint8(torch.tensor([-0.5])).tolist() == [64]


def test_sampler_input_checks():
    model = GaussianDenoiser(SCHEDULES["ve"], MU, STD)
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="descending"):
        sample_euler(model, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="generators"):
        sample_lcm(model, x, torch.tensor([80.0, 1.0]), generators=[torch.Generator()])
    with pytest.raises(ValueError, match="VP"):
        sample_tcd(model, x, torch.tensor([80.0, 1.0]))


def test_compiled_sampling_equals_eager_on_cpu(sd_dir):
    """generate(compile=True) (torch.compile, CPU inductor) gives the eager images within float
    tolerance, and EvalModel.sample (the bench's path) compiles through the same switch."""
    from diffdistill.eval.eval_model import EvalModel

    from diffdistill.backbone import load_backbone

    bb = load_backbone(str(sd_dir))
    prompts = ["a photo of a bag", "a coat"]
    kw = dict(seeds=[3, 4], shape=(4, 16, 16), sampler="ddim", num_steps=3, guidance_scale=2.0,
              cond_fn=lambda sl: bb.encode_prompts(prompts[sl]), decode=bb.decode_latents,
              output="float", progress=False)
    eager = generate(bb.denoiser(), **kw)
    assert getattr(bb.unet, "_compiled_call_impl", None) is None
    compiled = generate(bb.denoiser(), compile=True, **kw)
    assert getattr(bb.unet, "_compiled_call_impl", None) is not None  # compiled in place
    assert (compiled - eager).abs().max() <= 1e-4
    model = EvalModel("m", bb, bb.denoiser(), "ddim", compile=True)
    assert model.sample([3, 4], 3).shape == (2, 3, 32, 32)
