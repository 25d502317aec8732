"""Samplers shared by every trainer and the evaluation harness, plus batched seeded generation.

Every sampler is a plain function with one signature (k-diffusion style)::

    sample_<name>(model, x, timesteps, cond=None, *, guidance_scale=1.0, generators=None,
                  callback=None, **opts) -> Tensor

``model`` is a :class:`~diffdistill.denoiser.DenoiserBase` (``model(x_t, t, cond) ->
Prediction(x0, eps)``), ``x`` the starting sample already at the noise level of
``timesteps[0]`` (see :func:`initial_sample`), ``timesteps`` a descending 1-D tensor of the
schedule's *native* times (VP: integer-valued t in [0, T-1]; VE: sigma). Stochastic samplers
draw each step's fresh noise for sample ``i`` from ``generators[i]`` with the per-sample
shape, so an image depends only on its own seed, never on the batch size or the number of
processes. ``callback(i, t, x, x0_hat)`` sees the sample before step ``i`` and its x0̂.

Algorithms (each matches the named diffusers scheduler step for step; see the tests):

* :func:`sample_onestep` — x0̂ = f(x, t0): one-step generators (DMD2, f-distill, iCT, Hyper-SD).
* :func:`sample_lcm` — multistep consistency sampling (Luo et al. 2023, "Latent Consistency
  Models", Alg. 3; Song et al. 2023, "Consistency Models", Alg. 1): x0̂ = f(x, t_i), then
  re-noise to t_{i+1}; diffusers ``LCMScheduler``. On a VE schedule the same function is
  :func:`sample_cm_multistep` (``CMStochasticIterativeScheduler``).
* :func:`sample_tcd` — strategic stochastic sampling of Trajectory Consistency Distillation
  (Zheng et al. 2024, Sec. 4.3): DDIM jump to s = ⌊(1−γ) t_prev⌋, re-noise to t_prev;
  diffusers ``TCDScheduler``.
* :func:`sample_ddim` — DDIM (Song, Meng & Ermon 2021, Eq. 12), eta ≥ 0; ``DDIMScheduler``.
  Its single step, :func:`ddim_solver_step` (α_to x0̂ + σ_to ε̂ at eta = 0), is also the teacher
  ODE solver of the consistency-distillation trainers (LCD, Hyper-SD).
* :func:`sample_meanflow` — flow-map jumps z_r = z_t − (t − r)·u(z_t, r, t) (MeanFlow, Geng et
  al. 2025) over a :class:`~diffdistill.flowmap.FlowMap`; deterministic.
* :func:`sample_euler`, :func:`sample_heun` — Karras et al. 2022 ("EDM"), Alg. 1 with the
  Euler step / Alg. 2 deterministic 2nd-order Heun, stepping the probability-flow ODE in the
  VE-equivalent sigma (x_ve = x_native / alpha_t, k-diffusion's convention); on a
  rectified flow, in the flow's own sigma s (dx/ds = v), finite at s = 1.

Timestep grids that reproduce the stock schedulers' ``.timesteps``: :func:`lcm_timesteps`,
:func:`tcd_timesteps`, :func:`ddim_timesteps`, :func:`karras_timesteps`, :func:`cm_timesteps`;
:func:`default_timesteps` picks the right one for a sampler and schedule.

Design notes (where this module deliberately differs from stock diffusers):

* DDIM steps to the *next grid entry*. ``DDIMScheduler.step`` instead uses
  ``t − T // num_inference_steps``, which is the next entry for every "leading" grid and for
  "trailing"/"linspace" grids when T is divisible by the step count, and off by one or two
  timesteps otherwise (e.g. trailing 3 steps: grid 999, 666, 332 but stock steps 666 → 333).
* LCM ``clip_denoised`` clamps the *boundary-conditioned* x0̂ (the consistency function's
  output, as ``CMStochasticIterativeScheduler`` does), whereas ``LCMScheduler``'s
  ``clip_sample`` clamps the raw x0̂ before the boundary condition; SD configs set it False.
* DDIM and TCD return the final sample exactly as the stock schedulers do: the last DDIM step
  lands on ``alphas_cumprod_final`` (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``)
  and TCD's last step lands on t = 0 (√ᾱ₀ x0̂ + √(1−ᾱ₀) ε̂), not on x0̂ itself.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch

from .denoiser import Cond, DenoiserBase, Prediction
from .schedule import NoiseSchedule, karras_sigmas

Tensor = torch.Tensor
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]
Callback = Optional[Callable[[int, float, Tensor, Tensor], None]]

__all__ = [
    "sample_onestep", "sample_lcm", "sample_cm_multistep", "sample_tcd", "sample_ddim",
    "sample_euler", "sample_heun", "sample_meanflow", "ddim_solver_step", "SAMPLERS", "lcm_timesteps",
    "tcd_timesteps", "ddim_timesteps", "karras_timesteps", "cm_timesteps", "default_timesteps",
    "initial_sample", "seeded_noise", "to_uint8", "generate",
]


# ----------------------------------------------------------------------------- helpers


def _times(timesteps: Any) -> list[float]:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().flatten()
    if len(ts) == 0:
        raise ValueError("timesteps is empty")
    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    return ts.tolist()


def _alpha_sigma(schedule: NoiseSchedule, t: float) -> tuple[float, float]:
    a, s = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(a), float(s)


def _batch_t(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float64)


def _work(x: Tensor) -> Tensor:
    # Sampler arithmetic in float32 (float64 kept when given): fp16 x0 arithmetic is a known
    # source of speckled textures.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _noise(x: Tensor, generators: Generators) -> Tensor:
    """Fresh N(0, I) like ``x``; sample i's draw comes from ``generators[i]`` alone.

    Draws are float32 so that a batch-of-one loop over a stock diffusers scheduler with the
    same generator consumes the identical random stream.
    """
    if generators is None:
        return torch.randn(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)
    if isinstance(generators, torch.Generator):  # one stream for the whole batch (stock style)
        return torch.randn(x.shape, generator=generators, device=generators.device,
                           dtype=torch.float32).to(x.device, x.dtype)
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x.shape[0]}")
    draws = [torch.randn(tuple(x.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
             for g in generators]
    return torch.stack([d.to(x.device) for d in draws]).to(x.dtype)


def _denoise(model: DenoiserBase, x: Tensor, t: float, cond: Optional[Cond], gs: float):
    pred = model.guided(x, _batch_t(t, x), cond, gs)
    return pred.x0.to(x.dtype), pred.eps.to(x.dtype)


# ----------------------------------------------------------------------------- samplers


def sample_onestep(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
                   guidance_scale: float = 1.0, generators: Generators = None,
                   callback: Callback = None, clip_denoised: bool = False) -> Tensor:
    """One-step generation x0̂ = f(x, t0) (consistency / distribution-matching generators)."""
    x = _work(x)
    t0 = _times(timesteps)[0]
    x0, _ = _denoise(model, x, t0, cond, guidance_scale)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    if callback is not None:
        callback(0, t0, x, x0)
    return x0


def sample_lcm(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
               guidance_scale: float = 1.0, generators: Generators = None,
               callback: Callback = None, clip_denoised: bool = False) -> Tensor:
    """Multistep consistency sampling (Luo et al. 2023 Alg. 3; Song et al. 2023 Alg. 1)."""
    x = _work(x)
    ts = _times(timesteps)
    schedule = model.schedule
    for i, t in enumerate(ts):
        x0, _ = _denoise(model, x, t, cond, guidance_scale)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if callback is not None:
            callback(i, t, x, x0)
        if i == len(ts) - 1:  # no noise after the last step (also makes 1 step = onestep)
            return x0
        t_next = ts[i + 1]
        if schedule.kind == "ve":
            # CM re-noising keeps the sigma_min offset of the boundary condition: the
            # consistency function's input at sigma_min is already "clean" (Alg. 1, line 5).
            a_next = 1.0
            std = math.sqrt(max(t_next**2 - schedule.t_min**2, 0.0))
        else:
            a_next, std = _alpha_sigma(schedule, t_next)
        x = a_next * x0 + std * _noise(x, generators)
    raise AssertionError("unreachable")


def sample_cm_multistep(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None,
                        *, guidance_scale: float = 1.0, generators: Generators = None,
                        callback: Callback = None, clip_denoised: bool = False) -> Tensor:
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1): :func:`sample_lcm` on VE."""
    return sample_lcm(model, x, timesteps, cond, guidance_scale=guidance_scale,
                      generators=generators, callback=callback, clip_denoised=clip_denoised)


def _tcd_s(t_prev: float, gamma: float) -> float:
    if t_prev == int(t_prev):
        # Same float32 product as TCDScheduler (long tensor × python float) so the floor lands
        # on the same integer even where (1−γ)·t is an exact integer in real arithmetic.
        return float(torch.floor((1 - gamma) * torch.tensor(int(t_prev))))
    return float(math.floor((1 - gamma) * t_prev))


def sample_tcd(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
               guidance_scale: float = 1.0, generators: Generators = None,
               callback: Callback = None, gamma: float = 0.3, eta: Optional[float] = None
               ) -> Tensor:
    """TCD strategic stochastic sampling (Zheng et al. 2024, Sec. 4.3; ``TCDScheduler``).

    ``gamma`` (diffusers calls it ``eta``; 0.3 is the TCD default) = 0 is deterministic DDIM
    on the consistency trajectory. Pass the *plain* denoiser (TCD applies no LCM boundary
    condition). VP schedules only: γ scales discrete timesteps.
    """
    if eta is not None:
        gamma = eta
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must lie in [0, 1], got {gamma}")
    schedule = model.schedule
    if schedule.kind != "vp":
        raise ValueError("sample_tcd needs a VP (discrete-timestep) schedule")
    x = _work(x)
    ts = _times(timesteps)
    n = len(ts)
    for i, t in enumerate(ts):
        x0, eps = _denoise(model, x, t, cond, guidance_scale)
        if callback is not None:
            callback(i, t, x, x0)
        t_prev = ts[i + 1] if i + 1 < n else 0.0  # the last step lands on t = 0
        s = _tcd_s(t_prev, gamma)
        a_s, sig_s = _alpha_sigma(schedule, s)
        x_s = a_s * x0 + sig_s * eps  # DDIM jump t -> s with the predicted (x0, eps)
        if gamma > 0 and i < n - 1:
            a_prev, _ = _alpha_sigma(schedule, t_prev)
            ratio = (a_prev / a_s) ** 2  # alphabar_prev / alphabar_s: forward s -> t_prev
            x = math.sqrt(ratio) * x_s + math.sqrt(max(1.0 - ratio, 0.0)) * _noise(x, generators)
        else:
            x = x_s
    return x


def _final_alpha_sigma(schedule: NoiseSchedule, end: str = "scheduler"
                       ) -> tuple[float, float]:
    """Where DDIM's last step lands: diffusers' ``final_alpha_cumprod`` (``end="scheduler"``:
    ᾱ = 1 with ``set_alpha_to_one``, its default, else ᾱ₀) or always ᾱ₀ (``end="first"``, as
    LCM's DDIM solver does); sigma 0 for VE."""
    if schedule.kind != "vp":
        return 1.0, 0.0
    cfg = getattr(schedule, "config", {}) or {}
    # DDIMScheduler's default is set_alpha_to_one=True; SD's config says False.
    to_one = end == "scheduler" and cfg.get("set_alpha_to_one", True)
    acp = 1.0 if to_one else float(schedule.alphas_cumprod[0])
    return math.sqrt(acp), math.sqrt(1.0 - acp)


def ddim_solver_step(pred: Prediction, schedule: NoiseSchedule, t_from, t_to, *,
                     eta: float = 0.0, noise: Optional[Tensor] = None,
                     end: Literal["scheduler", "first"] = "scheduler") -> Tensor:
    """One DDIM step (Song, Meng & Ermon 2021, Eq. 12) from (x0̂, ε̂) predicted at ``t_from``.

    ``x_to = α_to x0̂ + sqrt(σ_to² − σ_η²) ε̂ + σ_η z`` with the Eq. 16 variance
    ``σ_η² = η² σ_to² (1 − SNR_from / SNR_to)``; at η = 0 this is the deterministic
    ``α_to x0̂ + σ_to ε̂``, the teacher ODE solver Ψ of latent consistency distillation (Luo et
    al. 2023, Sec. 4.2, with DDIM) and of Hyper-SD's segment targets. The one implementation used
    by :func:`sample_ddim` and every distillation target.

    ``t_from`` / ``t_to``: native times, scalars or one per sample. A negative ``t_to`` is the
    end of the chain, as in ``DDIMScheduler.step`` (``final_alpha_cumprod``: ᾱ = 1 with
    ``set_alpha_to_one``, else ᾱ₀; σ = 0 for VE) — or always ᾱ₀ with ``end="first"``, the
    LCM DDIM solver's ``alpha_cumprods_prev`` (Luo et al. 2023's code), whatever the teacher's
    scheduler config says. ``noise`` (needed when η > 0) is z.
    Coefficients are computed in float64 and applied in ``pred.x0``'s dtype.
    """
    x0, eps = pred
    n = x0.shape[0]

    def per_sample(t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().flatten()
        return t.expand(n) if t.numel() == 1 else t

    t_to = per_sample(t_to)
    if t_to.shape[0] != n:
        raise ValueError(f"t_to has {t_to.shape[0]} entries for a batch of {n}")
    a_to, s_to = schedule.alpha_sigma(t_to.clamp(min=0.0))
    final = t_to < 0
    if bool(final.any()):
        fa, fs = _final_alpha_sigma(schedule, end)
        a_to = torch.where(final, torch.full_like(a_to, fa), a_to)
        s_to = torch.where(final, torch.full_like(s_to, fs), s_to)
    c_eps = s_to
    std = torch.zeros_like(s_to)
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_solver_step with eta > 0 needs noise")
        a_from, s_from = schedule.alpha_sigma(per_sample(t_from))
        # Eq. 16: for VP this is diffusers' (1-ab_to)/(1-ab_from) (1 - ab_from/ab_to); it stays
        # valid for VE (alpha = 1).
        ratio = torch.where(s_to > 0, (a_from * s_to) ** 2 / (s_from * a_to) ** 2,
                            torch.ones_like(s_to))
        var = eta**2 * s_to**2 * (1.0 - ratio)
        std = var.clamp(min=0.0).sqrt()
        c_eps = (s_to**2 - std**2).clamp(min=0.0).sqrt()

    def coef(c: Tensor) -> Tensor:
        return c.to(x0.device, x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))

    x_to = coef(a_to) * x0 + coef(c_eps) * eps
    if eta > 0:
        x_to = x_to + coef(std) * noise.to(x0.dtype)
    return x_to


def sample_ddim(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
                guidance_scale: float = 1.0, generators: Generators = None,
                callback: Callback = None, eta: float = 0.0, clip_denoised: bool = False
                ) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12); eta = 0 deterministic, eta = 1 DDPM-like."""
    schedule = model.schedule
    x = _work(x)
    ts = _times(timesteps)
    n = len(ts)
    for i, t in enumerate(ts):
        x0, eps = _denoise(model, x, t, cond, guidance_scale)
        if clip_denoised:  # as DDIMScheduler's clip_sample: eps is left unchanged
            x0 = x0.clamp(-1, 1)
        if callback is not None:
            callback(i, t, x, x0)
        t_to = ts[i + 1] if i + 1 < n else -1.0  # -1: DDIM's final alpha (see ddim_solver_step)
        # drawn on every step when eta > 0, as DDIMScheduler does, to keep the streams aligned
        noise = _noise(x, generators) if eta > 0 else None
        x = ddim_solver_step(Prediction(x0, eps), schedule, t, t_to, eta=eta, noise=noise)
    return x


def sample_meanflow(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
                    guidance_scale: float = 1.0, generators: Generators = None,
                    callback: Callback = None, clip_denoised: bool = False) -> Tensor:
    """Flow-map sampling (MeanFlow, Geng et al. 2025, its 1-NFE sampling generalised): from native time t_i
    jump to r = t_{i+1} with z_r = z_t − (t − r)·u(z_t, r, t), the last jump to r = 0 (clean
    data). ``model`` is a :class:`~diffdistill.flowmap.FlowMap`; on the native grid a jump is
    the DDIM step with its (x0̂, ε̂) at Δ = t − r (flow times), so one step is x0̂ = ε − u(ε, 0, 1)
    and no noise is drawn. ``callback`` sees the jump's x0̂ (the sample at the last step)."""
    from .flowmap import flow_time

    if not callable(getattr(model, "jump", None)):
        raise ValueError(f"sampler 'meanflow' needs a flow map (diffdistill.flowmap.FlowMap: "
                         f"a network with a second time input), got {type(model).__name__}")
    x = _work(x)
    ts = _times(timesteps)
    schedule = model.schedule
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        r = 0.0 if last else float(flow_time(schedule, ts[i + 1]))
        pred = model.jump(x, _batch_t(t, x), cond, r, guidance_scale)
        x0, eps = pred.x0.to(x.dtype), pred.eps.to(x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
        if last:
            return x0.clamp(-1, 1) if clip_denoised else x0
        a_next, s_next = _alpha_sigma(schedule, ts[i + 1])
        x = a_next * x0 + s_next * eps
    raise AssertionError("unreachable")


def _karras_ode(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond],
                guidance_scale: float, callback: Callback, second_order: bool) -> Tensor:
    """dy/dσ = (y − D(y; σ))/σ (Karras et al. 2022, Alg. 1/2): an Euler step, plus Heun's
    correction at the next grid point when ``second_order``; a step to σ = 0 is exactly x0̂
    (Alg. 2 line 8). y is the sample in the schedule's VE-equivalent form, y = x/α with
    σ = σ_t/α_t — except on a rectified flow, x = (1 − s) x0 + s ε, which is stepped in its
    own s (y = x, σ = s): its VE sigma is infinite at s = 1, yet dx/ds = (x − x0̂)/s is the
    same equation, and its Euler step is ``flow_euler``'s (FlowMatchEulerDiscreteScheduler)."""
    schedule = model.schedule
    ts = _times(timesteps)
    if schedule.kind == "flow":
        T = float(schedule.num_train_timesteps)
        sigmas = [t / T for t in ts] + [0.0]

        def scale(t):
            return 1.0
    else:
        sigmas = [float(schedule.sigma_of_t(t)) for t in ts] + [0.0]  # Karras: sigma_N = 0

        def scale(t):
            return _alpha_sigma(schedule, t)[0]
    y = _work(x) / scale(ts[0])
    for i, t in enumerate(ts):
        x_native = scale(t) * y
        x0, _ = _denoise(model, x_native, t, cond, guidance_scale)
        if callback is not None:
            callback(i, t, x_native, x0)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            y = x0
            continue
        d = (y - x0) / sigma
        y_pred = y + (sigma_next - sigma) * d
        if not second_order:
            y = y_pred
            continue
        t_next = ts[i + 1]  # sigma_next is a grid point: evaluate at its native time
        x0_next, _ = _denoise(model, scale(t_next) * y_pred, t_next, cond, guidance_scale)
        d_next = (y_pred - x0_next) / sigma_next
        y = y + (sigma_next - sigma) * 0.5 * (d + d_next)
    return y


def sample_euler(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
                 guidance_scale: float = 1.0, generators: Generators = None,
                 callback: Callback = None) -> Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, Alg. 1)."""
    return _karras_ode(model, x, timesteps, cond, guidance_scale, callback, second_order=False)


def sample_heun(model: DenoiserBase, x: Tensor, timesteps, cond: Optional[Cond] = None, *,
                guidance_scale: float = 1.0, generators: Generators = None,
                callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method, deterministic (Karras et al. 2022, Alg. 2 with S_churn = 0)."""
    return _karras_ode(model, x, timesteps, cond, guidance_scale, callback, second_order=True)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "onestep": sample_onestep,
    "lcm": sample_lcm,
    "cm": sample_cm_multistep,
    "tcd": sample_tcd,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    # Euler on a rectified flow, x' = x + (s' − s) v (FlowMatchEulerDiscreteScheduler.step), is
    # DDIM's α' x0̂ + σ' ε̂ with α = 1 − s, σ = s, since x = (1 − s) x0̂ + s ε̂ — the same
    # step, named for the flow teachers' users. Its default grid is the scheduler's (below).
    "flow_euler": sample_ddim,
    "meanflow": sample_meanflow,
}


# ----------------------------------------------------------------------------- grids


def _evenly_pick(origin_descending: np.ndarray, num_steps: int) -> np.ndarray:
    # LCM/TCD pick floor(i * L / n) from the descending training grid; computed with numpy's
    # linspace so the float rounding is the stock schedulers' own.
    idx = np.floor(np.linspace(0, len(origin_descending), num=num_steps, endpoint=False))
    return origin_descending[idx.astype(np.int64)]


def _check_steps(num_steps: int, available: int, what: str) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps > available:
        raise ValueError(f"num_steps={num_steps} exceeds the {available} timesteps of {what}")


def lcm_timesteps(num_steps: int, original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000, strength: float = 1.0) -> Tensor:
    """``LCMScheduler.set_timesteps(num_steps, original_inference_steps)``'s grid (long)."""
    T = int(num_train_timesteps)
    if original_inference_steps > T:
        raise ValueError(f"original_inference_steps={original_inference_steps} > T={T}")
    k = T // original_inference_steps  # LCM's skipping step k (Luo et al. 2023, Sec. 4.2)
    origin = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    _check_steps(num_steps, len(origin), f"the {original_inference_steps}-step LCM grid")
    return torch.from_numpy(_evenly_pick(origin[::-1].copy(), num_steps)).long()


def tcd_timesteps(num_steps: int, original_inference_steps: Optional[int] = 50,
                  strength: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """``TCDScheduler(original_inference_steps=...).set_timesteps(num_steps)``'s grid (long).

    ``original_inference_steps=None`` gives the grid over all T training timesteps, which is
    what stock ``TCDScheduler.set_timesteps`` builds whenever ``original_inference_steps`` is
    passed to it explicitly (its config value is only used when that argument is omitted).
    """
    T = int(num_train_timesteps)
    if original_inference_steps is None:
        origin = np.arange(0, int(T * strength))
    else:
        if original_inference_steps > T:
            raise ValueError(f"original_inference_steps={original_inference_steps} > T={T}")
        k = T // original_inference_steps
        origin = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    _check_steps(num_steps, len(origin), "the TCD grid")
    return torch.from_numpy(_evenly_pick(origin[::-1].copy(), num_steps)).long()


def ddim_timesteps(num_steps: int, spacing: str = "leading", steps_offset: int = 1,
                   num_train_timesteps: int = 1000) -> Tensor:
    """``DDIMScheduler.set_timesteps`` grids (Lin et al. 2024, Table 2 spacings); long.

    ``steps_offset=1`` is SD1.5's config value (the DDIMScheduler class default is 0).
    """
    T = int(num_train_timesteps)
    _check_steps(num_steps, T, f"T={T}")
    if spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"spacing={spacing!r}; use 'leading', 'trailing' or 'linspace'")
    return torch.from_numpy(ts.astype(np.int64).copy())


def karras_timesteps(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0) -> Tensor:
    """Native times of the Karras grid (Eq. 5) from ``schedule.sigma_max`` to ``sigma_min``.

    The grid holds the ``num_steps`` noise levels where the network is evaluated; Euler and
    Heun then integrate from the last of them to sigma = 0 (Karras et al. append σ_N = 0), so
    the final 0 never needs a native time (it has none for VP teachers). Float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([schedule.t_max], dtype=torch.float64)
    sig = karras_sigmas(num_steps, schedule.sigma_min, schedule.sigma_max, rho)
    t = schedule.t_of_sigma(sig).to(torch.float64)
    # Pin the ends: the round trip through log-sigma interpolation is only ~1e-12 exact.
    t[0], t[-1] = schedule.t_max, schedule.t_min
    return t


def cm_timesteps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, num_train_timesteps: int = 40) -> Tensor:
    """Sigmas of ``CMStochasticIterativeScheduler.set_timesteps(num_steps)`` (VE native t).

    Step i sits at position i·⌊N/n⌋ of the N-point Karras training grid (N = 40 in the
    diffusers CM configs); float64 (stock ``.sigmas[:-1]`` are these cast to float32).
    """
    N = int(num_train_timesteps)
    _check_steps(num_steps, N, f"the {N}-point CM grid")
    ramp = np.arange(0, num_steps) * (N // num_steps) / (N - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((hi + ramp * (lo - hi)) ** rho).to(torch.float64)


def flow_timesteps(schedule, num_steps: int, *, mu: Optional[float] = None,
                   sigmas: Optional[Sequence[float]] = None) -> Tensor:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps``' grid as native times (float64 of
    its float32 timesteps): ``num_steps`` points evenly between the (shifted) training sigmas'
    ends, shifted (:meth:`~diffdistill.schedule.FlowSchedule.shift_sigmas`) — or the given
    ``sigmas`` shifted (what the Flux pipeline passes: ``linspace(1, 1/n, n)``), times T."""
    T = schedule.num_train_timesteps
    if sigmas is None and getattr(schedule, "pipeline_sigmas", None) == "flux":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline.__call__
    if sigmas is None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # the scheduler's training sigmas (float32; shifted unless the shift is dynamic)
        train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if not schedule.config.get("use_dynamic_shifting"):
            train = schedule.shift_sigmas(train)
        base = np.linspace(float(train[0]) * T, float(train[-1]) * T, num_steps) / T
    else:
        base = np.asarray(sigmas).astype(np.float32)  # as the scheduler casts given sigmas
    shifted = torch.from_numpy(np.asarray(schedule.shift_sigmas(base, mu))).float()
    return (shifted * T).double()


def default_timesteps(sampler: str, schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """The grid each sampler is normally run on, for this schedule ("onestep": [t_max])."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if sampler == "meanflow":  # even in flow time from the schedule's t_max to 0
        from .flowmap import flow_range, native_time

        flows = torch.linspace(flow_range(schedule)[1], 0.0, num_steps + 1,
                               dtype=torch.float64)[1:-1]
        return torch.cat([torch.tensor([schedule.t_max], dtype=torch.float64),
                          native_time(schedule, flows)])
    if schedule.kind == "flow" and sampler not in ("onestep", "cm", "tcd"):
        return flow_timesteps(schedule, num_steps)  # its scheduler's grid, for every sampler
    vp = schedule.kind == "vp"
    T = getattr(schedule, "num_train_timesteps", None)
    if sampler == "onestep":
        # Always one step, whatever num_steps says (a CLI's default step count must not make
        # one-step generation fail). DMD2 conditions its 1-step SD generator on t = T-1 (999);
        # VE models start at sigma_max.
        return torch.tensor([schedule.t_max], dtype=torch.float64)
    if sampler in ("lcm", "cm"):
        if vp:
            return lcm_timesteps(num_steps, num_train_timesteps=T)
        return cm_timesteps(num_steps, schedule.t_min, schedule.t_max)
    if sampler == "tcd":
        if not vp:
            raise ValueError("sampler 'tcd' needs a VP schedule")
        return tcd_timesteps(num_steps, num_train_timesteps=T)
    if sampler == "ddim" and vp:
        cfg = getattr(schedule, "config", {}) or {}
        return ddim_timesteps(num_steps, spacing=cfg.get("timestep_spacing", "leading"),
                              steps_offset=cfg.get("steps_offset", 0), num_train_timesteps=T)
    return karras_timesteps(schedule, num_steps)  # euler, heun, and DDIM on VE


# ----------------------------------------------------------------------------- generation


def initial_sample(schedule: NoiseSchedule, noise: Tensor, t0) -> Tensor:
    """x at the first timestep: VP and flow use the noise itself (x_T ≈ N(0, I), diffusers'
    ``init_noise_sigma = 1``; a flow's x at s = 1 is ε); VE scales it by sigma(t0)."""
    if schedule.kind in ("vp", "flow"):
        return noise
    return noise * float(schedule.sigma_of_t(torch.as_tensor(t0, dtype=torch.float64).flatten()[0]))


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device="cpu"
                 ) -> tuple[Tensor, list[torch.Generator]]:
    """One CPU generator per seed; sample i's initial noise is its generator's first draw.

    CPU generators make a seed give the same noise on every device and process.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])
    return noise.to(device), gens


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] → uint8 in [0, 255] (same layout, NCHW for images)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _find_unet(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    for m in (model, getattr(model, "denoiser", None)):
        if m is not None and isinstance(getattr(m, "unet", None), torch.nn.Module):
            return m.unet
    return None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def generate(model: DenoiserBase, *, seeds: Sequence[int], shape: Sequence[int],
             cond_fn: Optional[Callable[[slice], Optional[Cond]]], sampler: str = "lcm",
             num_steps: int = 4, timesteps=None, guidance_scale: float = 1.0,
             batch_size: int = 16, decode: Optional[Callable[[Tensor], Tensor]] = None,
             output: str = "uint8", progress: bool = True,
             autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             compile: bool = False, sampler_opts: Optional[dict] = None,
             device=None) -> Tensor:
    """Generate one sample per seed, batched; results do not depend on ``batch_size``.

    ``shape`` is the per-sample shape (C, H, W). ``cond_fn(slice)`` returns the conditioning
    for samples ``seeds[slice]`` (with ``uncond`` set when ``guidance_scale != 1``).
    ``decode(latents) -> images in [-1, 1]`` runs per batch, outside autocast (the caller's
    VAE picks its own precision). ``output``: "uint8" (NCHW images), "float" (images in
    [-1, 1], float32) or "latents" (the sampler's output before decoding). Runs under
    ``no_grad`` with the model in eval mode (its previous mode is restored). On CUDA,
    ``autocast_dtype`` / ``channels_last`` speed up the UNet; ``compile`` (any device: CPU
    inductor too) compiles the denoising network with ``torch.compile``. ``channels_last``
    and ``compile`` change the network in place (memory format; ``nn.Module.compile``, which
    keeps its state_dict keys; the first call pays the compile time). Returns a CPU tensor.
    """
    from tqdm.auto import tqdm

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if output not in ("uint8", "latents", "float"):
        raise ValueError(f"output={output!r}; use 'uint8', 'latents' or 'float'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = [int(s) for s in seeds]
    fn = SAMPLERS[sampler]
    opts = dict(sampler_opts or {})
    device = torch.device(device) if device is not None else _model_device(model)
    ts = (torch.as_tensor(timesteps) if timesteps is not None
          else default_timesteps(sampler, model.schedule, num_steps))
    cuda = device.type == "cuda"
    unet = _find_unet(model)
    if cuda and unet is not None and channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile and unet is not None and getattr(unet, "_compiled_call_impl", None) is None:
        unet.compile()
    amp = (torch.autocast("cuda", dtype=autocast_dtype) if (cuda and autocast_dtype is not None)
           else contextlib.nullcontext())

    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in tqdm(range(0, len(seeds), batch_size), disable=not progress,
                          desc=f"generate ({sampler}, {len(ts)} steps)", unit="batch"):
            sl = slice(start, min(start + batch_size, len(seeds)))
            noise, gens = seeded_noise(seeds[sl], shape, device)
            cond = cond_fn(sl) if cond_fn is not None else None
            if cond is not None:
                cond = cond.to(device)
            x = initial_sample(model.schedule, noise, ts[0])
            if cuda and channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                lat = fn(model, x, ts, cond, guidance_scale=guidance_scale, generators=gens,
                         **opts).float()
            if output == "latents":
                outs.append(lat.cpu())
                continue
            img = decode(lat) if decode is not None else lat
            img = img.float().contiguous()
            outs.append((to_uint8(img) if output == "uint8" else img).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs)
