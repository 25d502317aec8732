"""TrigFlow: the one conversion between a teacher's time / parameterisation and sCM's.

TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", Sec. 2 / Eq. 1–4) writes the noisy sample, with z ~ N(0, σ_d² I) and t̂ ∈ [0, π/2], as

    x_t̂ = cos(t̂)·x0 + sin(t̂)·z,        PF-ODE  dx_t̂/dt̂ = σ_d·F(x_t̂/σ_d, t̂),
    consistency function  f(x_t̂, t̂) = cos(t̂)·x_t̂ − sin(t̂)·σ_d·F(x_t̂/σ_d, t̂)      (Eq. 6)

and a network F_θ takes x_t̂/σ_d. Every schedule of the toolkit writes
x_t = α_t·x0 + σ_t·ε (ε ~ N(0, I)); matching the signal-to-noise ratio (Sec. 4.1 of the
paper's distillation of EDM/VP teachers; FastGen ``TrigFlowPrecond``) gives

    t̂ = atan2(σ_t, α_t·σ_d)                       (VP: α = √ᾱ, σ = √(1−ᾱ); flow: α = 1−s,
                                                   σ = s; VE: α = 1, σ = t)
    x_t = x_t̂ · α_t / cos(t̂) = x_t̂ · sqrt(α_t² + (σ_t/σ_d)²)        (same x0, ε; z = σ_d ε)

since x_t/α_t = x0 + (σ_t/α_t)·ε and x_t̂/cos(t̂) = x0 + tan(t̂)·σ_d·ε with
tan(t̂) = σ_t/(α_t σ_d). Going back, the teacher's native time of t̂ is the one whose
VE-equivalent sigma σ_t/α_t is σ_d·tan(t̂) (:meth:`NoiseSchedule.t_of_sigma`).

Parameterisations. Whatever the teacher predicts (ε, v, x0 on a VP schedule; the velocity
ε − x0 on a flow) the :class:`~diffdistill.denoiser.Denoiser` turns it into x0̂ once; the ideal
TrigFlow velocity at x_t̂ is E[cos(t̂)·z − sin(t̂)·x0 | x_t̂], and with ẑ = (x_t̂ − cos·x0̂)/sin:

    σ_d·F = cos(t̂)·ẑ − sin(t̂)·x0̂ = (cos(t̂)·x_t̂ − x0̂) / sin(t̂)            (so that f = x0̂)

and the inverse, from any F back to the teacher's x0̂ and ε̂ (ε̂ = ẑ/σ_d):

    x0̂ = cos(t̂)·x_t̂ − sin(t̂)·σ_d·F,      ẑ = sin(t̂)·x_t̂ + cos(t̂)·σ_d·F.

Consequence used by the sCM trainer: a student that is a Denoiser seen through :class:`TrigFlow`
has f_θ(x_t̂, t̂) = x0̂_θ(x_t, t) — its consistency function *is* its own x0̂ at the native time,
so its 1- and 2-step samples are the toolkit's consistency sampler on the native grid and its
export is an ordinary pipeline folder.

Guidance (sCD's teacher velocity, Lu & Song 2024 Sec. 5): the PF-ODE velocity is linear in
x0̂, so classifier-free guidance on x0̂ (:meth:`DenoiserBase.guided`) and on σ_d·F are the same
thing.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .denoiser import Cond, DenoiserBase, Prediction
from .schedule import NoiseSchedule

Tensor = torch.Tensor

HALF_PI = math.pi / 2


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device, like.dtype)


def trig_time(alpha: Any, sigma: Any, sigma_data: float = 0.5) -> Tensor:
    """t̂ = atan2(σ_t, α_t·σ_d) (float64)."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.atan2(s, a * sigma_data)


def trig_time_of(schedule: NoiseSchedule, t: Any, sigma_data: float = 0.5) -> Tensor:
    """The TrigFlow time of the schedule's native time ``t``."""
    alpha, sigma = schedule.alpha_sigma(t)
    return trig_time(alpha, sigma, sigma_data)


def native_time(schedule: NoiseSchedule, t_hat: Any, sigma_data: float = 0.5) -> Tensor:
    """The native time whose VE-equivalent sigma σ_t/α_t is σ_d·tan(t̂) (the inverse of
    :func:`trig_time_of`; forward-mode differentiable in t̂ away from the grid's integers on a
    VP table, where log σ is interpolated linearly as k-diffusion does)."""
    t_hat = torch.as_tensor(t_hat, dtype=torch.float64)
    return schedule.t_of_sigma(sigma_data * torch.tan(t_hat))


def trig_range(schedule: NoiseSchedule, sigma_data: float = 0.5) -> tuple[float, float]:
    """(t̂ of the schedule's t_min, t̂ of its t_max): the TrigFlow times the teacher knows."""
    return (float(trig_time_of(schedule, schedule.t_min, sigma_data)),
            float(trig_time_of(schedule, schedule.t_max, sigma_data)))


def input_scale(schedule: NoiseSchedule, t: Any, sigma_data: float = 0.5) -> Tensor:
    """sqrt(α_t² + (σ_t/σ_d)²) = α_t / cos(t̂): x_t = x_t̂ · this, at native time ``t``."""
    alpha, sigma = schedule.alpha_sigma(t)
    return (alpha**2 + (sigma / sigma_data) ** 2).sqrt()


def trig_noise(x0: Tensor, z: Tensor, t_hat: Tensor) -> Tensor:
    """x_t̂ = cos(t̂)·x0 + sin(t̂)·z (z ~ N(0, σ_d² I))."""
    return _bcast(torch.cos(t_hat), x0) * x0 + _bcast(torch.sin(t_hat), x0) * z


def trig_velocity(x0: Tensor, z: Tensor, t_hat: Tensor) -> Tensor:
    """dx_t̂/dt̂ of the pair (x0, z): cos(t̂)·z − sin(t̂)·x0 (sCT's data velocity)."""
    return _bcast(torch.cos(t_hat), x0) * z - _bcast(torch.sin(t_hat), x0) * x0


def velocity_from_x0(x_hat: Tensor, x0: Tensor, t_hat: Tensor) -> Tensor:
    """σ_d·F = (cos(t̂)·x_t̂ − x0̂) / sin(t̂): the TrigFlow velocity of a prediction x0̂."""
    return (_bcast(torch.cos(t_hat), x_hat) * x_hat - x0) / _bcast(torch.sin(t_hat), x_hat)


def prediction_from_velocity(x_hat: Tensor, velocity: Tensor, t_hat: Tensor,
                             sigma_data: float = 0.5) -> Prediction:
    """From σ_d·F back to the teacher's (x0̂, ε̂): x0̂ = cos·x_t̂ − sin·σ_d F,
    ε̂ = (sin·x_t̂ + cos·σ_d F)/σ_d."""
    c = _bcast(torch.cos(t_hat), x_hat)
    s = _bcast(torch.sin(t_hat), x_hat)
    return Prediction(c * x_hat - s * velocity, (s * x_hat + c * velocity) / sigma_data)


def consistency(x_hat: Tensor, velocity: Tensor, t_hat: Tensor) -> Tensor:
    """f(x_t̂, t̂) = cos(t̂)·x_t̂ − sin(t̂)·σ_d·F (Lu & Song 2024, Eq. 6)."""
    return prediction_from_velocity(x_hat, velocity, t_hat).x0


class TrigFlow(nn.Module):
    """Any toolkit denoiser (teacher or student, ε / v / x0 / flow) seen as TrigFlow's
    F(x_t̂/σ_d, t̂): ``TrigFlow(den)(x_hat, t_hat, cond) -> F`` (dimensionless; the PF-ODE
    velocity is σ_d·F, :meth:`velocity`). t̂ is clamped to the schedule's range
    (:func:`trig_range`, which is [~0, π/2) on a VP table and [0, π/2] on a flow) — outside
    it the teacher has never been trained. Differentiable in (x_t̂, t̂) by
    :func:`diffdistill.jvp.jvp`."""

    def __init__(self, denoiser: DenoiserBase, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"TrigFlow needs sigma_data > 0, got {sigma_data}")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.sigma_data = float(sigma_data)
        lo, hi = trig_range(self.schedule, self.sigma_data)
        # t̂ = 0 is x = x0 exactly: F = (x − x0̂)/sin(0) is undefined there
        self.t_hat_min = max(lo, 1e-6)
        self.t_hat_max = hi

    def native(self, x_hat: Tensor, t_hat: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, t̂) for the denoiser: t̂ per sample and clamped, t its native time,
        x_t = x_t̂·sqrt(α_t² + (σ_t/σ_d)²)."""
        t_hat = torch.as_tensor(t_hat, dtype=torch.float64, device=x_hat.device)
        if t_hat.ndim == 0:
            t_hat = t_hat.expand(x_hat.shape[0])
        t_hat = t_hat.clamp(self.t_hat_min, self.t_hat_max)
        t = native_time(self.schedule, t_hat.cpu(), self.sigma_data)
        scale = input_scale(self.schedule, t, self.sigma_data)
        x_t = x_hat * _bcast(scale, x_hat)
        return x_t, t, t_hat

    def prediction(self, x_hat: Tensor, t_hat: Any, cond: Optional[Cond] = None,
                   guidance_scale=1.0) -> tuple[Prediction, Tensor]:
        """The denoiser's (x0̂, ε̂) at x_t̂ (guided when ``guidance_scale`` ≠ 1), and the
        clamped t̂."""
        x_t, t, t_hat = self.native(x_hat, t_hat)
        return self.denoiser.guided(x_t, t, cond, guidance_scale), t_hat

    def velocity(self, x_hat: Tensor, t_hat: Any, cond: Optional[Cond] = None,
                 guidance_scale=1.0) -> Tensor:
        """dx_t̂/dt̂ = σ_d·F = (cos(t̂)·x_t̂ − x0̂)/sin(t̂) (sCD's teacher velocity when guided)."""
        pred, t_hat = self.prediction(x_hat, t_hat, cond, guidance_scale)
        return velocity_from_x0(x_hat.to(pred.x0.dtype), pred.x0, t_hat)

    def forward(self, x_hat: Tensor, t_hat: Any, cond: Optional[Cond] = None,
                guidance_scale=1.0) -> Tensor:
        return self.velocity(x_hat, t_hat, cond, guidance_scale) / self.sigma_data
