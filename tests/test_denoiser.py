import pytest
import torch
from torch import nn

from diffdistill.denoiser import (
    Cond,
    Denoiser,
    LCMConsistency,
    cm_boundary,
    guidance_scale_embedding,
    lcm_boundary,
)
from diffdistill.schedule import VESchedule, VPSchedule
from diffdistill.tiny import SD_SCHEDULER


class Out:
    def __init__(self, sample):
        self.sample = sample


class OracleNet(nn.Module):
    """Returns the exact target (ε, v, x0 or the CM network output) for known x0 and ε."""

    def __init__(self, x0, eps, schedule, kind, sigma_data=0.5):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.x0, self.eps, self.schedule, self.kind, self.sd = x0, eps, schedule, kind, sigma_data
        self.t_seen = None

    def forward(self, x, timestep, **kw):
        self.t_seen = timestep
        if self.kind == "cm":
            sigma = torch.exp(timestep.double() / 250.0)
            s = sigma.reshape(-1, 1, 1, 1)
            c_skip, c_out = cm_boundary(s, self.schedule.t_min, self.sd)
            xt = self.x0.double() + s * self.eps.double()
            return Out(((self.x0.double() - c_skip * xt) / c_out).float())
        a, s = self.schedule.alpha_sigma(timestep.double())
        a, s = a.reshape(-1, 1, 1, 1).float(), s.reshape(-1, 1, 1, 1).float()
        target = {"epsilon": self.eps, "v_prediction": a * self.eps - s * self.x0,
                  "sample": self.x0}[self.kind]
        return Out(target)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_vp_denoiser_recovers_x0_for_every_prediction_type(kind):
    g = torch.Generator().manual_seed(0)
    sched = VPSchedule.from_config(SD_SCHEDULER)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 250.0, 600.5, 980.0])
    xt = sched.add_noise(x0, eps, t)
    den = Denoiser(OracleNet(x0, eps, sched, kind), sched, kind)
    pred = den(xt, t)
    assert torch.allclose(pred.x0, x0, atol=1e-5 if kind != "epsilon" else 2e-4)
    assert torch.allclose(pred.eps, eps, atol=1e-4 if kind != "sample" else 2e-3)
    assert pred.x0.dtype == torch.float32


def test_a_network_returning_a_bare_tensor_keeps_every_sample():
    """raw() of a plain nn.Module (no ``.sample``): the whole batch, not out[0]."""
    class Bare(nn.Module):
        def __init__(self, as_tuple: bool):
            super().__init__()
            self.scale, self.as_tuple = nn.Parameter(torch.tensor(2.0)), as_tuple

        def forward(self, x, timestep, **kw):
            return (self.scale * x,) if self.as_tuple else self.scale * x

    sched = VPSchedule.from_config(SD_SCHEDULER)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 500.0)
    assert torch.equal(Denoiser(Bare(False), sched, "epsilon").raw(x, t, None), 2 * x)
    # diffusers' return_dict=False tuples still give their first entry
    assert torch.equal(Denoiser(Bare(True), sched, "epsilon").raw(x, t, None), 2 * x)


def test_cm_denoiser_recovers_x0_and_feeds_diffusers_timestep():
    g = torch.Generator().manual_seed(0)
    sched = VESchedule(0.002, 80.0)
    x0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    sig = torch.tensor([0.01, 1.0, 60.0])
    xt = x0 + sig.reshape(-1, 1, 1, 1) * eps
    net = OracleNet(x0, eps, sched, "cm")
    pred = Denoiser(net, sched, "cm")(xt, sig)
    assert torch.allclose(pred.x0, x0, atol=1e-4)
    # diffusers CMStochasticIterativeScheduler.sigma_to_t
    assert torch.allclose(net.t_seen.double(), 250 * torch.log(sig.double()), atol=1e-4)


def test_boundary_conditions_at_t0():
    c_skip, c_out = lcm_boundary(torch.tensor(0.0))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    c_skip, c_out = cm_boundary(torch.tensor(0.002), sigma_min=0.002)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # LCM at t=999: skip vanishes, out -> 1 (the values diffusers' LCMScheduler uses)
    c_skip, c_out = lcm_boundary(torch.tensor(999.0, dtype=torch.float64))
    assert float(c_skip) == pytest.approx(0.25 / (9990.0**2 + 0.25))
    assert float(c_out) == pytest.approx(9990.0 / (9990.0**2 + 0.25) ** 0.5)


def test_lcm_boundary_equals_diffusers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"})
    for t in [0, 19, 259, 999]:
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        ours = lcm_boundary(torch.tensor(float(t)))
        assert float(ours[0]) == pytest.approx(float(ref[0]), rel=1e-6)
        assert float(ours[1]) == pytest.approx(float(ref[1]), rel=1e-6)


def test_lcm_consistency_is_identity_at_t0():
    sched = VPSchedule.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    xt = torch.randn(2, 4, 8, 8, generator=g)
    f = LCMConsistency(Denoiser(OracleNet(x0, eps, sched, "sample"), sched, "sample"))
    assert torch.allclose(f(xt, torch.zeros(2)).x0, xt)
    t = torch.tensor([500.0, 500.0])
    c_skip, c_out = lcm_boundary(t)
    expect = c_skip.float().reshape(-1, 1, 1, 1) * xt + c_out.float().reshape(-1, 1, 1, 1) * x0
    assert torch.allclose(f(xt, t).x0, expect, atol=1e-6)


class CondNet(nn.Module):
    """ε̂ = x * 0 + (class label as a constant): makes CFG arithmetic checkable."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, timestep, class_labels=None):
        return Out(torch.ones_like(x) * class_labels.float().reshape(-1, 1, 1, 1))


def test_cfg_formula_and_lcm_w_form():
    sched = VPSchedule.from_config(SD_SCHEDULER)
    den = Denoiser(CondNet(), sched, "epsilon")
    x = torch.zeros(2, 3, 4, 4)
    cond = Cond(class_labels=torch.tensor([3, 3]), uncond=Cond(class_labels=torch.tensor([1, 1])))
    pred = den.guided(x, torch.tensor([10.0, 10.0]), cond, guidance_scale=4.0)
    assert torch.allclose(pred.eps, torch.full_like(x, 1 + 4.0 * (3 - 1)))
    # LCM/Imagen form with w = scale - 1: eps_c + w (eps_c - eps_u)
    w = 3.0
    assert torch.allclose(pred.eps, torch.full_like(x, 3 + w * (3 - 1)))
    with pytest.raises(ValueError, match="unconditional"):
        den.guided(x, 10.0, Cond(class_labels=torch.tensor([3, 3])), 2.0)


def test_real_unet_epsilon_formula():
    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet().eval()
    sched = VPSchedule.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([100.0, 800.0])
    with torch.no_grad():
        eps = unet(x, t, encoder_hidden_states=ehs).sample
        pred = Denoiser(unet, sched)(x, t, Cond(encoder_hidden_states=ehs))
    a, s = sched.alpha_sigma(t)
    x0 = (x - s.float().reshape(-1, 1, 1, 1) * eps) / a.float().reshape(-1, 1, 1, 1)
    assert torch.allclose(pred.x0, x0, atol=1e-6) and torch.equal(pred.eps, eps)


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 2.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.allclose(guidance_scale_embedding(w, 32), ref, atol=1e-6)


def test_guidance_embedding_stays_on_the_device_of_w():
    # The LCD trainer samples w on the GPU; the frequencies must follow it. The meta device
    # stands in for CUDA here: mixing it with a CPU tensor fails the same way.
    w = torch.tensor([0.0, 2.5, 7.0], device="meta")
    emb = guidance_scale_embedding(w, 32)
    assert emb.device == w.device and emb.shape == (3, 32)


def test_cond_cat_repeat_index():
    c1 = Cond(encoder_hidden_states=torch.zeros(2, 3, 4),
              added_cond_kwargs={"text_embeds": torch.zeros(2, 5), "time_ids": torch.zeros(2, 6)})
    c2 = Cond(encoder_hidden_states=torch.ones(1, 3, 4),
              added_cond_kwargs={"text_embeds": torch.ones(1, 5), "time_ids": torch.ones(1, 6)})
    c = Cond.cat([c1, c2])
    assert c.batch_size == 3
    assert c.added_cond_kwargs["time_ids"][:, 0].tolist() == [0, 0, 1]
    r = c2.repeat(3)
    assert r.batch_size == 3 and float(r.encoder_hidden_states.sum()) == 36.0
    assert c.index(slice(2, 3)).encoder_hidden_states.sum() == 12.0
    with pytest.raises(ValueError, match="class_labels"):
        Cond.cat([Cond(class_labels=torch.zeros(1)), Cond(timestep_cond=torch.zeros(1, 2))])
