"""Euler / Heun (Karras et al. 2022, Alg. 1/2) on a rectified-flow model: stepped in the
flow's own sigma, finite at s = 1 (the VE form would divide by α(s=1) = 0)."""

from __future__ import annotations

import pytest
import torch
from test_flow import SD3, VelocityNet  # the seeded stand-in flow network
from torch import nn

from diffdistill.denoiser import Denoiser
from diffdistill.sampling import generate, sample_euler, sample_heun
from diffdistill.schedule import FlowSchedule


class ExactVelocity(nn.Module):
    """The straight path's velocity ε − x0 for one fixed (x0, ε) pair, whatever x is."""

    def __init__(self, x0, eps):
        super().__init__()
        self.register_buffer("v", eps - x0)
        self.unused = nn.Parameter(torch.zeros(1))  # the denoiser reads its dtype from one

    def forward(self, x, timestep, **kwargs):
        return (self.v.expand_as(x),)


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
@pytest.mark.parametrize("grid", [[1000.0], [1000.0, 600.0, 250.0]])
def test_flow_ode_from_s1_lands_on_x0_of_a_straight_path(sampler, grid):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    den = Denoiser(ExactVelocity(x0, eps), FlowSchedule.from_config(SD3),
                   prediction_type="flow")
    with torch.no_grad():
        out = sampler(den, eps.clone(), torch.tensor(grid, dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, x0, atol=1e-5), float((out - x0).abs().max())


def test_flow_euler_and_heun_through_generate():
    den = Denoiser(VelocityNet(), FlowSchedule.from_config(SD3), prediction_type="flow")
    kw = dict(seeds=[0, 1], shape=(4, 8, 8), cond_fn=lambda sl: None, output="latents",
              progress=False)
    euler = generate(den, sampler="euler", num_steps=6, **kw)
    flow_euler = generate(den, sampler="flow_euler", num_steps=6, **kw)
    assert torch.allclose(euler, flow_euler, atol=1e-5)  # the same step on the same grid
    heun = generate(den, sampler="heun", num_steps=6, **kw)
    fine = generate(den, sampler="euler", num_steps=200, **kw)
    assert torch.isfinite(heun).all() and float(heun.std()) > 0.1
    # second order: at 6 steps Heun is closer to the fine solution than Euler
    assert (heun - fine).abs().mean() < (euler - fine).abs().mean()
