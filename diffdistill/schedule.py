"""Noise schedules: the one place that knows noise levels.

Every network in the toolkit sees data as ``x_t = alpha_t * x0 + sigma_t * eps`` where
``t`` is the model's *native* time variable:

* :class:`VPSchedule` — discrete DDPM / Stable Diffusion teachers (Ho et al. 2020):
  ``t`` in ``[0, T-1]`` (float allowed), ``alpha_t = sqrt(alphas_cumprod[t])``. Fractional
  ``t`` interpolates ``log sigma`` linearly, as k-diffusion's ``DiscreteSchedule`` does, so
  ``t -> sigma -> t`` round-trips.
* :class:`VESchedule` — EDM / consistency-model pixel networks (Karras et al. 2022; Song
  et al. 2023): ``t`` *is* sigma, ``alpha_t = 1``.
* :class:`FlowSchedule` — rectified-flow teachers (Liu et al. 2023; SD3, Esser et al. 2024,
  Eq. 2 and sec. 3.1; Flux): ``x_t = (1 − s) x0 + s ε`` with ``s = t / T``, ``t`` in
  ``[0, T]`` as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it to the transformer.
  The timestep shift (static ``shift``, or Flux's resolution-dependent ``mu``) shapes the
  *sampling grid* (:meth:`FlowSchedule.shift_sigmas`), not the meaning of ``t``.

Both expose the "VE-equivalent" sigma ``sigma_t / alpha_t`` (k-diffusion's convention),
which is what Karras grids and the Euler/Heun samplers step in.

Densities the methods need live here too: uniform-t (DMD2 draws t ~ U[0.02T, 0.98T]),
lognormal sigma (EDM), and iCT's discretized lognormal over a Karras grid (Song & Dhariwal
2023, Sec. 3.5: P(i) ∝ erf((log σ_{i+1} − P_mean)/(√2 P_std)) − erf((log σ_i − P_mean)/(√2 P_std))).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import torch

Tensor = torch.Tensor

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _as_tensor(t: Any, dtype=torch.float64) -> Tensor:
    return t.to(dtype) if isinstance(t, Tensor) else torch.as_tensor(t, dtype=dtype)


def betas_for_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Optional[list] = None,
) -> Tensor:
    """Betas exactly as diffusers' DDPM-family schedulers build them (float32 arithmetic)."""
    T = int(num_train_timesteps)
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, Eq. 17, with beta capped at 0.999.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; use one of {_BETA_SCHEDULES}"
    )


class NoiseSchedule:
    """Common interface. Subclasses define ``alpha_sigma`` and the VE-sigma mapping."""

    kind: str = ""
    #: smallest / largest native time the schedule is trained on
    t_min: float
    t_max: float

    def alpha_sigma(self, t: Any) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def sigma_of_t(self, t: Any) -> Tensor:
        """VE-equivalent sigma = sigma_t / alpha_t."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_of_sigma(self, sigma: Any, quantize: bool = False) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_of_t(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_of_t(self.t_max))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``alpha_t x0 + sigma_t noise`` with per-sample ``t`` (float32 math)."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = alpha.to(torch.float32).reshape(shape).to(x0.device)
        s = sigma.to(torch.float32).reshape(shape).to(x0.device)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def to_config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule from ``alphas_cumprod`` (SD1.5, SDXL, DDPM)."""

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, config: Optional[Mapping] = None):
        acp = _as_tensor(alphas_cumprod, torch.float64).flatten()
        if acp.ndim != 1 or len(acp) < 2 or not bool(((acp > 0) & (acp <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        self.alphas_cumprod = acp
        self.num_train_timesteps = len(acp)
        self.config = dict(config or {})
        self.sigmas = ((1 - acp) / acp).sqrt()  # VE-equivalent, increasing in t
        self.log_sigmas = self.sigmas.log()
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "VPSchedule":
        """Build from a diffusers scheduler config (dict or ``scheduler.config``)."""
        cfg = dict(config)
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError(
                "rescale_betas_zero_snr=True teachers (sigma_max = inf) are not supported yet"
            )
        betas = betas_for_config(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
            beta_start=cfg.get("beta_start", 0.0001),
            beta_end=cfg.get("beta_end", 0.02),
            beta_schedule=cfg.get("beta_schedule", "linear"),
            trained_betas=cfg.get("trained_betas"),
        )
        # diffusers computes the cumulative product in float32; doing the same keeps our
        # samplers bit-compatible with stock schedulers.
        acp = torch.cumprod(1.0 - betas, dim=0)
        return cls(acp, config=cfg)

    def alpha_sigma(self, t: Any) -> tuple[Tensor, Tensor]:
        t = _as_tensor(t)
        ti = t.round()
        if bool((t == ti).all()):  # exact table look-up for integer timesteps
            acp = self.alphas_cumprod[ti.long().clamp(0, self.num_train_timesteps - 1)]
            return acp.sqrt(), (1 - acp).sqrt()
        s = self._interp_sigma(t)
        alpha = (1 + s**2).rsqrt()
        return alpha, s * alpha

    def _interp_sigma(self, t: Tensor) -> Tensor:
        t = t.clamp(self.t_min, self.t_max)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]
        return log_s.exp()

    def sigma_of_t(self, t: Any) -> Tensor:
        t = _as_tensor(t)
        if bool((t == t.round()).all()):
            return self.sigmas[t.long().clamp(0, self.num_train_timesteps - 1)]
        return self._interp_sigma(t)

    def t_of_sigma(self, sigma: Any, quantize: bool = False) -> Tensor:
        """Inverse of :meth:`sigma_of_t` by interpolation over log sigma (k-diffusion)."""
        log_sigma = _as_tensor(sigma).clamp_min(1e-30).log()
        dists = log_sigma.reshape(-1, 1) - self.log_sigmas.reshape(1, -1)
        if quantize:
            return dists.abs().argmin(dim=1).reshape(log_sigma.shape).to(torch.float64)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=self.num_train_timesteps - 2)
        lo_s, hi_s = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo_s - log_sigma.reshape(-1)) / (lo_s - hi_s)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(log_sigma.shape)

    def to_config(self) -> dict:
        return dict(self.config) or {"num_train_timesteps": self.num_train_timesteps}


class VESchedule(NoiseSchedule):
    """Variance-exploding schedule where the native time *is* sigma (EDM, CM, iCT)."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min = float(sigma_min)
        self.t_max = float(sigma_max)
        self.num_train_timesteps = None

    def alpha_sigma(self, t: Any) -> tuple[Tensor, Tensor]:
        sigma = _as_tensor(t)
        return torch.ones_like(sigma), sigma

    def sigma_of_t(self, t: Any) -> Tensor:
        return _as_tensor(t)

    def t_of_sigma(self, sigma: Any, quantize: bool = False) -> Tensor:
        return _as_tensor(sigma)

    def to_config(self) -> dict:
        return {"sigma_min": self.t_min, "sigma_max": self.t_max}


class FlowSchedule(NoiseSchedule):
    """Rectified flow: ``alpha_t = 1 − t/T``, ``sigma_t = t/T`` (the network predicts the
    velocity ``v = ε − x0``, :class:`~diffdistill.denoiser.Denoiser` ``"flow"``).

    ``config`` is the diffusers ``FlowMatchEulerDiscreteScheduler`` config: ``shift`` (SD3: 3),
    or ``use_dynamic_shifting`` with ``base_shift`` / ``max_shift`` / ``base_image_seq_len``
    / ``max_image_seq_len`` (Flux), ``time_shift_type`` (exponential | linear). ``mu``: the
    resolution-dependent shift of a dynamic-shifting model (:func:`flow_shift_mu`), set by
    whoever knows the image size (the backbone); None otherwise."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, config: Optional[Mapping] = None,
                 mu: Optional[float] = None):
        self.num_train_timesteps = int(num_train_timesteps)
        self.config = dict(config or {})
        self.mu = mu
        #: the sigmas a pipeline passes to ``set_timesteps``: None for the scheduler's own grid
        #: (SD3), "flux" for the Flux pipeline's ``linspace(1, 1/n, n)``
        self.pipeline_sigmas: Optional[str] = None
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
        cfg = dict(config)
        # (``stochastic_sampling``, which a flow student's export sets, is how the stock
        # scheduler steps — x0̂ re-noised along the path, the toolkit's consistency sampler
        # that the export's diffdistill_export.json names — not a property of the schedule.)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "shift_terminal"):
            if cfg.get(key):
                raise ValueError(f"FlowMatchEulerDiscreteScheduler with {key}={cfg[key]!r} is "
                                 "not supported yet")
        return cls(cfg.get("num_train_timesteps", 1000), config=cfg)

    def alpha_sigma(self, t: Any) -> tuple[Tensor, Tensor]:
        s = _as_tensor(t) / self.num_train_timesteps
        return 1 - s, s

    def sigma_of_t(self, t: Any) -> Tensor:
        s = _as_tensor(t) / self.num_train_timesteps
        return s / (1 - s)

    def t_of_sigma(self, sigma: Any, quantize: bool = False) -> Tensor:
        ve = _as_tensor(sigma)
        t = ve / (1 + ve) * self.num_train_timesteps
        return t.round() if quantize else t

    def shift_sigmas(self, sigmas: Any, mu: Optional[float] = None) -> Any:
        """The scheduler's timestep shift of flow sigmas in [0, 1]: static
        ``shift·s / (1 + (shift − 1)·s)`` (SD3, Esser et al. 2024, Eq. 23), or with dynamic
        shifting ``e^μ / (e^μ + (1/s − 1))`` (exponential; ``μ / (μ + (1/s − 1))`` linear).
        Arithmetic in the input's own type and precision (a numpy float32 array stays float32,
        as in the scheduler), so grids match the stock ones bit for bit."""
        if isinstance(sigmas, (int, float)):
            sigmas = np.float64(sigmas)
        cfg = self.config
        if cfg.get("use_dynamic_shifting"):
            mu = self.mu if mu is None else mu
            if mu is None:
                raise ValueError("this flow model shifts its timesteps by resolution "
                                 "(use_dynamic_shifting): give mu (flow_shift_mu(image_seq_len))")
            if cfg.get("time_shift_type", "exponential") == "linear":
                return mu / (mu + (1 / sigmas - 1))
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        shift = float(cfg.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def set_image_seq_len(self, seq_len: int) -> None:
        """Set μ from the latent token count, as the pipelines' ``calculate_shift`` does with
        the scheduler config's ends (a no-op for a static shift)."""
        cfg = self.config
        if cfg.get("use_dynamic_shifting"):
            self.mu = flow_shift_mu(int(seq_len), cfg.get("base_image_seq_len", 256),
                                    cfg.get("max_image_seq_len", 4096),
                                    cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def to_config(self) -> dict:
        return dict(self.config) or {"num_train_timesteps": self.num_train_timesteps}


def flow_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift μ: linear in the number of latent tokens from
    ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (the pipelines'
    ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


#: diffusers scheduler classes whose teachers are rectified flows
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                   "FlowMatchLCMScheduler")


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Pick VP, VE or flow from a diffusers scheduler config (CMStochasticIterative → VE,
    FlowMatch* → flow)."""
    cfg = dict(config)
    name = cfg.get("_class_name", "")
    if name in ("CMStochasticIterativeScheduler", "EDMEulerScheduler"):
        return VESchedule(cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0))
    if name in FLOW_SCHEDULERS:
        return FlowSchedule.from_config(cfg)
    return VPSchedule.from_config(cfg)


# ----------------------------------------------------------------------------- grids


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,  # EDM / iCT defaults
    sigma_max: float = 80.0,
    rho: float = 7.0,
    descending: bool = True,
) -> Tensor:
    """Karras et al. 2022, Eq. 5: ``(σmax^(1/ρ) + i/(n−1)(σmin^(1/ρ) − σmax^(1/ρ)))^ρ``."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 points, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (lo + ramp * (hi - lo)) ** rho  # ascending
    return sig.flip(0) if descending else sig


# ----------------------------------------------------------------------------- densities


def sample_uniform_t(
    n: int,
    t_lo: float,
    t_hi: float,
    generator: Optional[torch.Generator] = None,
    discrete: bool = True,
) -> Tensor:
    """t ~ U[t_lo, t_hi]; integer-valued (inclusive) when ``discrete``."""
    if discrete:
        return torch.randint(int(t_lo), int(t_hi) + 1, (n,), generator=generator).to(
            torch.float64
        )
    return t_lo + (t_hi - t_lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_lognormal_sigma(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None  # EDM defaults
) -> Tensor:
    """log σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1)."""
    return (p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()


def ict_index_probs(
    sigmas_ascending: Tensor,
    p_mean: float = -1.1,  # Song & Dhariwal 2023, Sec. 3.5 (note the sign)
    p_std: float = 2.0,
) -> Tensor:
    """Discretized lognormal over adjacent pairs of an ascending grid: length N−1.

    ``P(i) ∝ erf((log σ_{i+1} − P_mean)/(√2 P_std)) − erf((log σ_i − P_mean)/(√2 P_std))``.
    """
    s = _as_tensor(sigmas_ascending)
    if not bool((s[1:] > s[:-1]).all()):
        raise ValueError("ict_index_probs expects an ascending sigma grid")
    cdf = torch.erf((s.log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def sample_ict_indices(probs: Tensor, n: int, generator=None) -> Tensor:
    """Draw grid indices i (the lower σ_i of the pair) from :func:`ict_index_probs`."""
    return torch.multinomial(probs.float(), n, replacement=True, generator=generator)
