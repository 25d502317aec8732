import math

import pytest
import torch

from diffdistill.schedule import (
    VESchedule,
    VPSchedule,
    ict_index_probs,
    karras_sigmas,
    sample_ict_indices,
    sample_uniform_t,
    schedule_from_scheduler_config,
)
from diffdistill.tiny import SD_SCHEDULER


@pytest.mark.parametrize(
    "cfg",
    [
        SD_SCHEDULER,
        dict(num_train_timesteps=1000, beta_schedule="linear"),
        dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    ],
)
def test_alphas_cumprod_equal_diffusers(cfg):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler.from_config(cfg).alphas_cumprod.double()
    sched = VPSchedule.from_config(cfg)
    assert torch.equal(sched.alphas_cumprod, ref)
    a, s = sched.alpha_sigma(torch.tensor([0, 499, 999]))
    assert torch.allclose(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    assert torch.equal(a**2, ref[[0, 499, 999]].sqrt() ** 2)


def test_sd15_sigma_range_known_values():
    sched = VPSchedule.from_config(SD_SCHEDULER)
    # SD1.5's well-known VE-equivalent range (k-diffusion): ~0.0292 .. ~14.6146
    assert sched.sigma_min == pytest.approx(0.029168, rel=1e-3)
    assert sched.sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_t_sigma_round_trip_float_and_quantized():
    sched = VPSchedule.from_config(SD_SCHEDULER)
    t = torch.tensor([0.0, 1.5, 10.25, 499.0, 777.7, 999.0], dtype=torch.float64)
    back = sched.t_of_sigma(sched.sigma_of_t(t))
    assert torch.allclose(back, t, atol=1e-6)
    q = sched.t_of_sigma(sched.sigma_of_t(torch.tensor([3.0, 640.0])), quantize=True)
    assert q.tolist() == [3.0, 640.0]


def test_fractional_t_interpolates_log_sigma():
    sched = VPSchedule.from_config(SD_SCHEDULER)
    s = sched.sigma_of_t(torch.tensor([100.5]))
    expect = math.exp(0.5 * (math.log(sched.sigmas[100]) + math.log(sched.sigmas[101])))
    assert float(s) == pytest.approx(expect, rel=1e-12)
    a, sg = sched.alpha_sigma(torch.tensor([100.5]))
    assert float(sg / a) == pytest.approx(expect, rel=1e-12)


def test_add_noise_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler.from_config(SD_SCHEDULER)
    sched = VPSchedule.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    assert torch.allclose(sched.add_noise(x0, n, t), ref.add_noise(x0, n, t), atol=1e-6)


def test_ve_schedule_and_config_dispatch():
    ve = schedule_from_scheduler_config(
        {"_class_name": "CMStochasticIterativeScheduler", "sigma_min": 0.002, "sigma_max": 80.0}
    )
    assert isinstance(ve, VESchedule)
    a, s = ve.alpha_sigma(torch.tensor([0.5, 80.0]))
    assert a.tolist() == [1.0, 1.0] and s.tolist() == [0.5, 80.0]
    assert isinstance(schedule_from_scheduler_config(SD_SCHEDULER), VPSchedule)
    with pytest.raises(ValueError, match="beta_schedule"):
        VPSchedule.from_config({"beta_schedule": "cubic"})


def test_karras_grid_formula():
    s = karras_sigmas(18, 0.002, 80.0, 7.0, descending=False)
    assert float(s[0]) == pytest.approx(0.002) and float(s[-1]) == pytest.approx(80.0)
    i = 5
    expect = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert float(s[i]) == pytest.approx(expect, rel=1e-12)
    assert torch.equal(karras_sigmas(18), s.flip(0))


def test_ict_discretized_lognormal_against_erf():
    sig = karras_sigmas(11, descending=False)  # N = 10 + 1 (the curriculum's start)
    p = ict_index_probs(sig, p_mean=-1.1, p_std=2.0)
    raw = [
        math.erf((math.log(sig[i + 1]) + 1.1) / (math.sqrt(2) * 2.0))
        - math.erf((math.log(sig[i]) + 1.1) / (math.sqrt(2) * 2.0))
        for i in range(10)
    ]
    expect = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    assert torch.allclose(p, expect, atol=1e-12)
    assert float(p.sum()) == pytest.approx(1.0)
    # the mode sits near sigma = exp(-1.1) ~ 0.33, not at exp(+1.1) (the known sign bug)
    mode = int(p.argmax())
    assert sig[mode] < 1.0 < sig[mode + 2] or sig[mode] < 0.4
    idx = sample_ict_indices(p, 20000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=10).double() / 20000
    assert torch.allclose(freq, p, atol=0.015)


def test_uniform_t_range():
    t = sample_uniform_t(5000, 20, 980, generator=torch.Generator().manual_seed(1))
    assert float(t.min()) == 20 and float(t.max()) == 980
    assert bool((t == t.round()).all())
