"""Rectified-flow teachers (SD3 / Flux class): the schedule, the velocity denoiser, and the
flow Euler sampler step for step against stock diffusers' FlowMatchEulerDiscreteScheduler
(static shift as SD3, resolution-dependent shift as Flux)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from diffdistill.denoiser import Denoiser
from diffdistill.export import SAMPLER_FOR_SCHEDULER
from diffdistill.sampling import default_timesteps, flow_timesteps, generate, seeded_noise
from diffdistill.schedule import FlowSchedule, flow_shift_mu, schedule_from_scheduler_config

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
       "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
        "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096}


class VelocityNet(nn.Module):
    """A seeded conv net of (x, t): a stand-in flow transformer (returns a tuple, as
    diffusers models do with return_dict=False)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x, timestep, **kwargs):
        t = timestep.float().reshape(-1, 1, 1, 1) / 1000.0
        return (torch.tanh(self.conv(x)) * (1 + t) - 0.3 * x,)


def _stock(config):
    cfg = {k: v for k, v in config.items() if k != "_class_name"}
    return FlowMatchEulerDiscreteScheduler(**cfg)


def test_schedule_is_the_straight_path():
    sched = schedule_from_scheduler_config(SD3)
    assert isinstance(sched, FlowSchedule) and sched.kind == "flow"
    t = torch.tensor([0.0, 250.0, 999.0, 1000.0], dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    assert torch.equal(alpha + sigma, torch.ones(4, dtype=torch.float64))
    assert sigma.tolist() == [0.0, 0.25, 0.999, 1.0]
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.allclose(sched.add_noise(x0, eps, t), (1 - t / 1000)[:, None].float() * x0
                          + (t / 1000)[:, None].float() * eps, atol=1e-6)
    mid = t[1:3]
    assert torch.allclose(sched.t_of_sigma(sched.sigma_of_t(mid)), mid, rtol=1e-12)
    # SD3's static shift: s -> 3s / (1 + 2s) (Esser et al. 2024, Eq. 23); 1 stays 1
    assert float(sched.shift_sigmas(0.5)) == pytest.approx(0.75)
    assert float(sched.shift_sigmas(1.0)) == 1.0
    with pytest.raises(ValueError, match="mu"):
        FlowSchedule.from_config(FLUX).shift_sigmas(0.5)
    with pytest.raises(ValueError, match="not supported"):
        FlowSchedule.from_config({**SD3, "use_karras_sigmas": True})
    assert SAMPLER_FOR_SCHEDULER["FlowMatchEulerDiscreteScheduler"] == "flow_euler"


@pytest.mark.parametrize("n", [1, 2, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_grid_equals_the_stock_scheduler_static_shift(n, shift):
    cfg = {**SD3, "shift": shift}
    stock = _stock(cfg)
    stock.set_timesteps(n)
    ours = flow_timesteps(FlowSchedule.from_config(cfg), n)
    assert torch.equal(ours.float(), stock.timesteps)
    assert torch.equal(default_timesteps("flow_euler", FlowSchedule.from_config(cfg), n), ours)


@pytest.mark.parametrize("n", [1, 4, 20])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_grid_equals_the_stock_scheduler_dynamic_shift_as_flux(n, seq_len):
    """The Flux pipeline: sigmas linspace(1, 1/n, n) and mu from the latent token count."""
    mu = flow_shift_mu(seq_len)
    assert mu == pytest.approx(0.5 + (seq_len - 256) * 0.65 / 3840)
    sigmas = np.linspace(1.0, 1 / n, n)
    stock = _stock(FLUX)
    stock.set_timesteps(sigmas=sigmas, mu=mu)
    sched = FlowSchedule.from_config(FLUX)
    ours = flow_timesteps(sched, n, mu=mu, sigmas=sigmas)
    assert torch.equal(ours.float(), stock.timesteps)
    sched.mu = mu  # what the backbone sets for its resolution: then the default grid shifts
    assert torch.allclose(default_timesteps("flow_euler", sched, n).float(),
                          _grid_of(FLUX, n, mu), rtol=0, atol=0)


def _grid_of(cfg, n, mu):
    stock = _stock(cfg)
    stock.set_timesteps(n, mu=mu)
    return stock.timesteps


def test_velocity_denoiser_recovers_x0_and_noise():
    sched = FlowSchedule.from_config(SD3)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([10.0, 500.0, 990.0])
    x = sched.add_noise(x0, eps, t)

    class Oracle(nn.Module):  # the exact velocity of this x0 / eps pair
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def forward(self, x, timestep, **kw):
            return (eps - x0,)

    den = Denoiser(Oracle(), sched, prediction_type="flow")
    pred = den(x, t)
    assert torch.allclose(pred.x0, x0, atol=1e-5) and torch.allclose(pred.eps, eps, atol=1e-5)
    assert torch.equal(den.target(x0, eps, t), eps - x0)  # the flow-matching target
    with pytest.raises(ValueError, match="FlowSchedule"):
        Denoiser(Oracle(), sched, prediction_type="epsilon")


@pytest.mark.parametrize("config,n,mu", [(SD3, 1, None), (SD3, 4, None), (SD3, 28, None),
                                         (FLUX, 4, flow_shift_mu(64))])
def test_flow_euler_equals_the_stock_scheduler_step_for_step(config, n, mu):
    net = VelocityNet()
    sched = FlowSchedule.from_config(config)
    sched.mu = mu
    den = Denoiser(net, sched, prediction_type="flow")
    seeds = [3, 4]
    ours = generate(den, seeds=seeds, shape=(4, 8, 8), sampler="flow_euler", num_steps=n,
                    cond_fn=lambda sl: None, output="latents", progress=False)
    stock = _stock(config)
    stock.set_timesteps(n, mu=mu)
    x, _ = seeded_noise(seeds, (4, 8, 8))
    with torch.no_grad():
        for t in stock.timesteps:
            v = net(x, t.expand(len(seeds)))[0]
            x = stock.step(v, t, x).prev_sample
    assert torch.allclose(ours, x, atol=2e-5), float((ours - x).abs().max())
    assert float(x.std()) > 0.1


def test_consistency_sampler_renoises_along_the_flow_path():
    """The few-step consistency sampler on a flow: x0̂ at each grid point, then back to the
    next one along x = (1 − s') x0̂ + s' z (as FlowMatchLCMScheduler's step)."""
    net = VelocityNet()
    sched = FlowSchedule.from_config(SD3)
    den = Denoiser(net, sched, prediction_type="flow")
    ts = default_timesteps("lcm", sched, 3)
    ours = generate(den, seeds=[7], shape=(4, 8, 8), sampler="lcm", num_steps=3,
                    cond_fn=lambda sl: None, output="latents", progress=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn((1, 4, 8, 8), generator=g)
    with torch.no_grad():
        for i, t in enumerate(ts):
            s = float(t) / 1000
            x0 = x - s * net(x, torch.tensor([float(t)]))[0]
            if i + 1 < len(ts):
                s2 = float(ts[i + 1]) / 1000
                x = (1 - s2) * x0 + s2 * torch.randn(x.shape, generator=g)
    assert torch.allclose(ours, x0, atol=1e-5)
    assert math.isclose(float(ts[0]), 1000.0)


def test_a_diffusers_folder_with_a_flow_scheduler_loads_as_a_flow_teacher(pixel_dir, tmp_path):
    """A UNet folder whose scheduler is FlowMatchEulerDiscreteScheduler: the backbone reads a
    velocity model on the flow schedule, and the shared sampler draws from it end to end."""
    import json
    import shutil

    from diffdistill.backbone import load_backbone

    folder = tmp_path / "flow_unet"
    shutil.copytree(pixel_dir, folder)
    conf = folder / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**SD3, "_diffusers_version": "0.42.1"}))
    bb = load_backbone(str(folder))
    assert bb.prediction_type == "flow" and bb.schedule.kind == "flow"
    den = bb.denoiser()
    imgs = generate(den, seeds=[0, 1], shape=(3, 16, 16), sampler="flow_euler", num_steps=2,
                    cond_fn=lambda sl: bb.class_cond([0, 1][sl], guidance=False),
                    output="uint8", progress=False)
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.uint8
