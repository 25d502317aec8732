"""diffdistill.jvp: the one forward-mode derivative of a backbone (sCM's dF/dt̂, MeanFlow's du/dt).

Checked against hand-derived derivatives of networks whose Jacobian is known in closed form,
and — for every backbone the toolkit loads (UNet2DModel, UNet2DConditionModel full and LoRA,
SD3's MMDiT, Flux's transformer), through the Denoiser — against central differences in
float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffdistill.denoiser import Cond, Denoiser
from diffdistill.jvp import jvp
from diffdistill.schedule import FlowSchedule, VPSchedule

F64 = torch.float64


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


class LinearXT(nn.Module):
    """f(x, t) = W ⋆ x + t·a + b (a 1×1 convolution plus a per-channel time slope): its JVP
    along (v, τ) is W ⋆ v + τ·a, by hand."""

    def __init__(self, c=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(c, c, 1, bias=True).to(F64)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(c, c, 1, 1, generator=g, dtype=F64))
        self.a = nn.Parameter(torch.randn(c, dtype=F64, generator=g))

    def forward(self, x, t):
        return self.conv(x) + t.reshape(-1, 1, 1, 1) * self.a.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_jvp_of_a_network_linear_in_x_and_t_is_its_matrix_times_the_tangent(method):
    net = LinearXT()
    g = torch.Generator().manual_seed(1)
    x, v = (torch.randn(2, 3, 4, 4, generator=g, dtype=F64) for _ in range(2))
    t = torch.tensor([0.3, 1.2], dtype=F64)
    tau = torch.tensor([2.0, -0.5], dtype=F64)
    out, d = jvp(net, (x, t), (v, tau), method=method)
    W = net.conv.weight[:, :, 0, 0]
    hand = torch.einsum("oc,bchw->bohw", W, v) + tau.reshape(-1, 1, 1, 1) * net.a.reshape(1, -1, 1, 1)
    assert torch.allclose(out, net(x, t), atol=0, rtol=0)
    assert torch.allclose(d, hand, atol=1e-9, rtol=0)
    # the x-part alone and the t-part alone (the other input held constant)
    _, dx = jvp(net, (x, t), (v, None), method=method)
    _, dt = jvp(net, (x, t), (None, tau), method=method)
    assert torch.allclose(dx + dt, hand, atol=1e-9, rtol=0)
    assert torch.allclose(dt, tau.reshape(-1, 1, 1, 1) * net.a.reshape(1, -1, 1, 1).expand_as(d),
                          atol=1e-9, rtol=0)


def u_meanflow_like(z, r, t, scale):
    """u(z, r, t) = (t − r)²·z + sin(t)·z² + scale (a non-tensor input, held constant)."""
    return (t - r).reshape(-1, 1) ** 2 * z + torch.sin(t).reshape(-1, 1) * z**2 + scale


@pytest.mark.parametrize("method,tol", [("autograd", 1e-12), ("finite_difference", 1e-7)])
def test_meanflow_tangents_v_0_1_give_the_hand_derivative(method, tol):
    """MeanFlow's du/dt = v·∂_z u + ∂_t u (Geng et al. 2025, Eq. 8): tangents (v, None, 1)
    — r held constant — equal tangents (v, 0, 1) and the hand derivative
    v·((t−r)² + 2 sin(t) z) + 2(t−r) z + cos(t) z²."""
    g = torch.Generator().manual_seed(2)
    z, v = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(2))
    r = torch.tensor([0.1, 0.2, 0.5], dtype=F64)
    t = torch.tensor([0.4, 0.9, 0.5], dtype=F64)
    one = torch.ones_like(t)
    out, d = jvp(u_meanflow_like, (z, r, t, 0.25), (v, None, one, None), method=method,
                 fd_eps=1e-5)
    _, d0 = jvp(u_meanflow_like, (z, r, t, 0.25), (v, torch.zeros_like(r), one, None),
                method=method, fd_eps=1e-5)
    tr = (t - r).reshape(-1, 1)
    hand = v * (tr**2 + 2 * torch.sin(t).reshape(-1, 1) * z) + 2 * tr * z \
        + torch.cos(t).reshape(-1, 1) * z**2
    assert torch.allclose(out, u_meanflow_like(z, r, t, 0.25))
    assert torch.allclose(d, hand, atol=tol, rtol=0)
    assert torch.allclose(d0, hand, atol=tol, rtol=0)


def test_bad_tangents_are_refused_in_one_line():
    x = torch.randn(2, 3)
    f = lambda a, b: a * b  # noqa: E731
    with pytest.raises(ValueError, match="every tangent is None"):
        jvp(f, (x, x), (None, None))
    with pytest.raises(ValueError, match="2 primal inputs but 1 tangents"):
        jvp(f, (x, x), (x,))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        jvp(f, (x, x), (torch.randn(3), None))
    with pytest.raises(ValueError, match="not a floating-point tensor"):
        jvp(lambda a, k: a * k, (x, 2.0), (x, torch.ones(())))
    with pytest.raises(ValueError, match="method='forward'"):
        jvp(f, (x, x), (x, None), method="forward")


def test_no_grad_is_the_stopgrad_pass_and_grad_mode_backpropagates_through_the_output():
    net = LinearXT()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    t = torch.tensor([0.3, 1.2], dtype=F64)
    v = torch.randn_like(x)
    out, d = jvp(net, (x, t), (v, torch.ones_like(t)))
    assert not out.requires_grad and not d.requires_grad
    out, d = jvp(net, (x, t), (v, torch.ones_like(t)), no_grad=False)
    assert out.requires_grad
    (out.square().sum()).backward()
    got = net.a.grad.clone()
    net.zero_grad()
    net(x, t).square().sum().backward()
    assert torch.allclose(got, net.a.grad, rtol=1e-12, atol=0)


def test_finite_differences_use_the_primal_forwards_dropout_mask():
    """f(x) = dropout(x)·3 in training mode: its JVP along v is the *masked* 3v/(1−p). The
    three forwards of the central difference must draw the mask the autograd forward draws
    (from the caller's RNG state), and leave the RNG where one forward leaves it."""
    drop = nn.Dropout(0.5).train()
    f = lambda x: drop(x) * 3  # noqa: E731
    x, v = torch.randn(4, 64, dtype=F64), torch.randn(4, 64, dtype=F64)
    torch.manual_seed(5)
    out_a, d_a = jvp(f, (x,), (v,))
    after_a = torch.rand(3)
    torch.manual_seed(5)
    out_f, d_f = jvp(f, (x,), (v,), method="finite_difference", fd_eps=1e-4)
    after_f = torch.rand(3)
    mask = (out_a != 0).to(F64)
    assert 0.2 < float(mask.mean()) < 0.8
    assert torch.equal(out_a, out_f)
    assert torch.allclose(d_a, 6.0 * mask * v, rtol=1e-12, atol=0)
    assert torch.allclose(d_f, d_a, rtol=0, atol=1e-9)
    assert torch.equal(after_a, after_f)


# ---------------------------------------------------------------- every backbone kind

VP = VPSchedule.from_config(dict(num_train_timesteps=1000))


def _pixel():
    from diffdistill.tiny import tiny_pixel_unet

    return (tiny_pixel_unet(), VP, "epsilon", (2, 3, 16, 16),
            Cond(class_labels=torch.tensor([1, 10])))


def _sd(lora=False):
    from diffdistill.adapters import make_trainable
    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet()
    if lora:
        make_trainable(unet, rank=4)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in unet.modules():
                if hasattr(m, "lora_B"):
                    m.lora_B["default"].weight.normal_(0, 0.2, generator=g)
    return (unet, VP, "epsilon" if lora else "v_prediction", (2, 4, 8, 8),
            Cond(encoder_hidden_states=torch.randn(2, 5, 32)))


def _sd3():
    from diffdistill.tiny import tiny_sd3_transformer

    return (tiny_sd3_transformer(), FlowSchedule(1000, dict(shift=3.0)), "flow", (2, 4, 8, 8),
            Cond(encoder_hidden_states=torch.randn(2, 5, 64), pooled_projections=torch.randn(2, 64)))


def _flux():
    from diffdistill.tiny import tiny_flux_transformer

    return (tiny_flux_transformer(), FlowSchedule(1000, dict(shift=3.0)), "flow", (2, 4, 8, 8),
            Cond(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 32),
                 guidance=torch.tensor([3.5, 1.0])))


BACKBONES = {"pixel-unet": _pixel, "sd-unet": _sd, "sd-unet-lora": lambda: _sd(lora=True),
             "sd3-mmdit": _sd3, "flux": _flux}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_backbone_jvp_agrees_with_central_differences(kind):
    """x0̂(x_t, t) of each backbone through the Denoiser, in float64: along x the two agree to
    ~1e-6 relative; along the native time to ~1e-3 (diffusers embeds the timestep in float32,
    which rounds t and bounds the finite difference's accuracy; h = 0.03 timesteps is the
    measured sweet spot between that rounding and the O(h²) truncation)."""
    torch.manual_seed(0)
    net, sched, pred, shape, cond = BACKBONES[kind]()
    net = net.to(F64).eval()
    den = Denoiser(net, sched, pred, compute_dtype=F64)
    cond = cond.to(dtype=F64)
    f = lambda x, t: den(x, t, cond).x0  # noqa: E731
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(shape, generator=g, dtype=F64) for _ in range(2))
    t = torch.tensor([300.3, 700.6], dtype=F64)
    out, dx = jvp(f, (x, t), (v, None))
    assert torch.allclose(out, f(x, t), rtol=1e-12, atol=1e-12)
    _, dx_fd = jvp(f, (x, t), (v, None), method="finite_difference", fd_eps=1e-4)
    assert _rel(dx_fd, dx) < 1e-5
    _, dt = jvp(f, (x, t), (None, torch.ones_like(t)))
    _, dt_fd = jvp(f, (x, t), (None, torch.ones_like(t)), method="finite_difference", fd_eps=0.03)
    assert _rel(dt_fd, dt) < 3e-3
    # linearity in the tangent: the JVP along (v, 1) is the sum of the two (up to the float32
    # rounding of the time embedding's tangent)
    _, both = jvp(f, (x, t), (v, torch.ones_like(t)))
    assert _rel(both, dx + dt) < 1e-7


def test_the_math_attention_switch_is_what_makes_a_cross_attention_unet_differentiable():
    """Plain ``torch.func.jvp`` through a UNet2DConditionModel fails on the fused CPU attention
    kernel; :func:`jvp` works, and its output is the ordinary forward's (float32)."""
    torch.manual_seed(0)
    net, sched, pred, shape, cond = _sd()
    den = Denoiser(net.eval(), sched, pred)
    f = lambda x, t: den(x, t, cond).x0  # noqa: E731
    x = torch.randn(shape)
    t = torch.tensor([300.0, 700.0], dtype=F64)
    tangents = (torch.randn(shape), torch.ones_like(t))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(f, (x, t), tangents)
    out, d = jvp(f, (x, t), tangents)
    with torch.no_grad():
        assert torch.allclose(out, f(x, t), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(d).all() and d.abs().mean() > 0
