"""diffdistill.trigflow: TrigFlow time, scaling and velocity over every teacher kind, checked
against hand computations (Lu & Song 2024, Sec. 2: x_t̂ = cos t̂ x0 + sin t̂ z, dx/dt̂ = σ_d F)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffdistill.denoiser import Cond, Denoiser
from diffdistill.jvp import jvp
from diffdistill.schedule import FlowSchedule, VESchedule, VPSchedule
from diffdistill.trigflow import (
    TrigFlow,
    consistency,
    input_scale,
    native_time,
    prediction_from_velocity,
    trig_noise,
    trig_range,
    trig_time,
    trig_time_of,
    trig_velocity,
    velocity_from_x0,
)

F64 = torch.float64
SD = 0.5
VP = VPSchedule.from_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                 beta_start=0.00085, beta_end=0.012))
FLOW = FlowSchedule(1000)
VE = VESchedule(0.002, 80.0)
SCHEDULES = {"vp": VP, "flow": FLOW, "ve": VE}


def test_trig_time_by_hand():
    # flow at s = 0.5: α = σ = 0.5, t̂ = atan(0.5 / (0.5·0.5)) = atan(2)
    assert float(trig_time_of(FLOW, 500.0, SD)) == pytest.approx(math.atan(2.0), abs=1e-15)
    # flow s = 1: α = 0, t̂ = π/2 exactly; s = 0: t̂ = 0
    assert float(trig_time_of(FLOW, 1000.0, SD)) == math.pi / 2
    assert float(trig_time_of(FLOW, 0.0, SD)) == 0.0
    # VE σ = 0.5 = σ_d: t̂ = π/4
    assert float(trig_time_of(VE, 0.5, SD)) == pytest.approx(math.pi / 4, abs=1e-15)
    # VP at integer t: α = √ᾱ_t, σ = √(1−ᾱ_t)
    abar = float(VP.alphas_cumprod[321])
    want = math.atan2(math.sqrt(1 - abar), math.sqrt(abar) * SD)
    assert float(trig_time_of(VP, 321, SD)) == pytest.approx(want, abs=1e-12)
    assert float(trig_time(0.6, 0.8, 0.5)) == pytest.approx(math.atan(0.8 / 0.3), abs=1e-15)
    lo, hi = trig_range(VP, SD)
    # SD's table ends at σ_ve = σ_t/α_t ≈ 14.6: t̂_max = atan(σ_ve/σ_d), short of π/2
    assert hi == pytest.approx(math.atan(VP.sigma_max / SD), abs=1e-12) and 1.5 < hi < 1.54
    assert lo == pytest.approx(math.atan(VP.sigma_min / SD), abs=1e-12) and 0 < lo < 0.1


@pytest.mark.parametrize("kind,t", [("vp", [10.0, 321.0, 654.25, 998.5]),
                                    ("flow", [1.0, 250.0, 500.0, 999.0]),
                                    ("ve", [0.01, 0.5, 3.0, 79.0])])
def test_native_time_inverts_trig_time_and_the_scale_maps_x_that_to_x_t(kind, t):
    sched = SCHEDULES[kind]
    t = torch.tensor(t, dtype=F64)
    t_hat = trig_time_of(sched, t, SD)
    assert torch.allclose(native_time(sched, t_hat, SD), t, rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(4, 3, 2, 2, generator=g, dtype=F64) for _ in range(2))
    x_hat = trig_noise(x0, SD * eps, t_hat)
    # by hand: x_t = α x0 + σ ε with the schedule's own α, σ
    alpha, sigma = sched.alpha_sigma(t)
    x_t = alpha.reshape(-1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1) * eps
    scale = input_scale(sched, t, SD).reshape(-1, 1, 1, 1)
    assert torch.allclose(x_hat * scale, x_t, rtol=1e-10, atol=1e-12)


class Oracle(nn.Module):
    """A 'teacher' that knows (x0, ε): it checks that the x it receives is α x0 + σ ε at the
    timestep it receives, and returns its parameterisation's exact target there."""

    def __init__(self, sched, pred, x0, eps):
        super().__init__()
        self.sched, self.pred, self.x0, self.eps = sched, pred, x0, eps
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x, timestep, **kw):
        alpha, sigma = self.sched.alpha_sigma(timestep.to(F64))
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        assert torch.allclose(x, a * self.x0 + s * self.eps, rtol=1e-5, atol=1e-5)
        return ({"epsilon": self.eps, "v_prediction": a * self.eps - s * self.x0,
                 "sample": self.x0, "flow": self.eps - self.x0}[self.pred],)


@pytest.mark.parametrize("kind,pred", [("vp", "epsilon"), ("vp", "v_prediction"),
                                       ("vp", "sample"), ("flow", "flow"), ("ve", "epsilon")])
def test_a_teachers_velocity_is_cos_z_minus_sin_x0_and_inverts_to_its_x0_and_eps(kind, pred):
    """For the exact teacher, σ_d·F at x_t̂ = cos x0 + sin z is the pair's own velocity
    cos(t̂)·z − sin(t̂)·x0 (z = σ_d ε), whichever parameterisation it predicts in; F back to
    the teacher's world gives its x0 and ε; the consistency function is x0."""
    sched = SCHEDULES[kind]
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(3, 3, 4, 4, generator=g, dtype=F64) for _ in range(2))
    t_hat = torch.tensor([0.2, 0.9, 1.45], dtype=F64)
    tf = TrigFlow(Denoiser(Oracle(sched, pred, x0, eps), sched, pred, compute_dtype=F64), SD)
    x_hat = trig_noise(x0, SD * eps, t_hat)
    c, s = torch.cos(t_hat).reshape(-1, 1, 1, 1), torch.sin(t_hat).reshape(-1, 1, 1, 1)
    hand = c * SD * eps - s * x0
    assert torch.allclose(trig_velocity(x0, SD * eps, t_hat), hand, rtol=0, atol=1e-15)
    v = tf.velocity(x_hat, t_hat)
    assert torch.allclose(v, hand, rtol=1e-5, atol=1e-5)
    assert torch.allclose(tf(x_hat, t_hat), hand / SD, rtol=1e-5, atol=2e-5)
    back = prediction_from_velocity(x_hat, v, t_hat, SD)
    assert torch.allclose(back.x0, x0, atol=1e-5) and torch.allclose(back.eps, eps, atol=1e-5)
    assert torch.allclose(consistency(x_hat, v, t_hat), x0, atol=1e-5)


def test_velocity_from_x0_and_its_inverse_by_hand():
    """σ_d F = (cos·x − x0̂)/sin and back, at t̂ = π/3: cos = 1/2, sin = √3/2."""
    x, x0 = torch.tensor([[2.0]], dtype=F64), torch.tensor([[0.5]], dtype=F64)
    t = torch.tensor([math.pi / 3], dtype=F64)
    v = velocity_from_x0(x, x0, t)
    assert float(v) == pytest.approx((0.5 * 2.0 - 0.5) / (math.sqrt(3) / 2), abs=1e-14)
    back = prediction_from_velocity(x, v, t, sigma_data=0.5)
    assert float(back.x0) == pytest.approx(0.5, abs=1e-14)
    # ẑ = sin·x + cos·σ_d F = √3 + (1/2)(1/√3) ; ε̂ = ẑ/σ_d
    assert float(back.eps) == pytest.approx((math.sqrt(3) + 0.5 / math.sqrt(3)) / 0.5, abs=1e-13)


def _pixel_teacher(dtype=F64):
    from diffdistill.tiny import tiny_pixel_unet

    torch.manual_seed(0)
    return Denoiser(tiny_pixel_unet().to(dtype).eval(), VP, "epsilon", compute_dtype=dtype)


def test_guided_velocity_is_the_guidance_of_the_two_velocities():
    """sCD's teacher velocity with CFG scale w: σ_d F_u + w (σ_d F_c − σ_d F_u), since the
    velocity is affine in x0̂ with the same x_t̂."""
    tf = TrigFlow(_pixel_teacher(), SD)
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    t_hat = torch.tensor([0.4, 1.2], dtype=F64)
    cond = Cond(class_labels=torch.tensor([3, 7]), uncond=Cond(class_labels=torch.tensor([10, 10])))
    with torch.no_grad():
        vc = tf.velocity(x, t_hat, Cond(class_labels=cond.class_labels))
        vu = tf.velocity(x, t_hat, cond.uncond)
        vg = tf.velocity(x, t_hat, cond, guidance_scale=4.5)
    assert (vc - vu).abs().max() > 1e-3
    assert torch.allclose(vg, vu + 4.5 * (vc - vu), rtol=1e-9, atol=1e-9)


def test_trigflow_of_a_vp_backbone_is_differentiable_in_t_hat():
    """The JVP of F(x_t̂, t̂) along (v, 1) — through the native time (interpolated log σ), the
    input scale and the x0̂ → F conversion — agrees with central differences in t̂."""
    tf = TrigFlow(_pixel_teacher(), SD)
    cond = Cond(class_labels=torch.tensor([3, 7]))
    f = lambda x, th: tf(x, th, cond)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    x, v = (torch.randn(2, 3, 16, 16, generator=g, dtype=F64) for _ in range(2))
    t_hat = torch.tensor([0.4, 1.2], dtype=F64)
    one = torch.ones_like(t_hat)
    out, d = jvp(f, (x, t_hat), (v, one))
    _, d_fd = jvp(f, (x, t_hat), (v, one), method="finite_difference", fd_eps=1e-4)
    assert float((d - d_fd).norm() / d.norm()) < 2e-3
    # the t̂-part is not zero (the time enters through the conversion and the network)
    _, dt = jvp(f, (x, t_hat), (None, one))
    assert float(dt.norm()) > 1e-2 * float(d.norm())


def test_a_constant_x0_network_has_the_hand_derivative():
    """A teacher predicting a fixed x0 ('sample', ignoring its inputs): σ_d F = (cos x − x0)/sin,
    so along (ẋ, 1): d(σ_d F) = (cos ẋ − sin x)/sin − cos (cos x − x0)/sin²."""

    class Fixed(nn.Module):
        def __init__(self, x0):
            super().__init__()
            self.x0 = nn.Parameter(x0)

        def forward(self, x, timestep, **kw):
            return (self.x0.expand_as(x),)

    g = torch.Generator().manual_seed(3)
    x, xd, x0 = (torch.randn(2, 3, 2, 2, generator=g, dtype=F64) for _ in range(3))
    tf = TrigFlow(Denoiser(Fixed(x0), VE, "sample", compute_dtype=F64), SD)
    t_hat = torch.tensor([0.3, 1.1], dtype=F64)
    _, d = jvp(tf.velocity, (x, t_hat), (xd, torch.ones_like(t_hat)))
    c, s = torch.cos(t_hat).reshape(-1, 1, 1, 1), torch.sin(t_hat).reshape(-1, 1, 1, 1)
    hand = (c * xd - s * x) / s - c * (c * x - x0) / s**2
    assert torch.allclose(d, hand, rtol=1e-10, atol=1e-10)


def test_t_hat_is_clamped_to_the_teachers_range():
    tf = TrigFlow(_pixel_teacher(torch.float32), SD)
    x = torch.randn(1, 3, 16, 16)
    _, t, t_hat = tf.native(x, torch.tensor([math.pi / 2]))
    assert float(t_hat) == pytest.approx(tf.t_hat_max) and float(t) == pytest.approx(999.0)
    _, t, _ = tf.native(x, torch.tensor([0.0]))
    assert float(t) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigma_data > 0"):
        TrigFlow(_pixel_teacher(torch.float32), 0.0)
