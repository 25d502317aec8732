"""Losses as pure functions returning one value per sample (the trainer reduces).

* :func:`pseudo_huber` — iCT (Song & Dhariwal 2023, Sec. 3.3): d(x, y) = sqrt(‖x−y‖² + c²) − c
  over the whole sample, c = 0.00054·sqrt(d) (:func:`ict_huber_c`).
* :func:`elementwise_huber` — the LCM reference scripts' Huber: mean of
  sqrt((x−y)² + c²) − c over elements, c = 0.001.
* :func:`l2` — mean squared error per sample.
* :func:`dmd_loss` — DMD/DMD2 distribution matching (Yin et al. 2024, Eq. 2 and the public
  code's normalisation): p_real = x − x0̂_real, p_fake = x − x0̂_fake,
  g = (p_real − p_fake) / mean|p_real|, optionally scaled by a per-sample weight h (f-distill,
  Xu et al. 2025, Eq. 9); loss = ½ mean (x − sg(x − g))², whose gradient w.r.t. x is g / D.
* :func:`gan_generator_loss`, :func:`gan_discriminator_loss` — non-saturating softplus GAN
  (Goodfellow et al. 2014; DMD2 Sec. 4.2).
* :data:`F_DIVERGENCE_WEIGHTS` — h(r) for each f-divergence (f-distill, Table 1), and
  :func:`density_ratio` r = exp(clamped discriminator logit), clamped.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _flat(x: Tensor) -> Tensor:
    return x.float().reshape(x.shape[0], -1)


def ict_huber_c(x: Tensor) -> float:
    """c = 0.00054·sqrt(d) with d the dimensionality of one sample (iCT, Sec. 3.3)."""
    return 0.00054 * math.sqrt(x[0].numel())


def pseudo_huber(x: Tensor, y: Tensor, c: Optional[float] = None) -> Tensor:
    """sqrt(‖x − y‖² + c²) − c per sample; ``c`` defaults to :func:`ict_huber_c`."""
    c = ict_huber_c(x) if c is None else c
    sq = (_flat(x) - _flat(y)).pow(2).sum(dim=1)
    return (sq + c * c).sqrt() - c


def elementwise_huber(x: Tensor, y: Tensor, c: float = 0.001) -> Tensor:
    """mean over elements of sqrt((x − y)² + c²) − c (LCM's ``loss_type=huber``)."""
    return ((_flat(x) - _flat(y)).pow(2) + c * c).sqrt().sub(c).mean(dim=1)


def l2(x: Tensor, y: Tensor) -> Tensor:
    return (_flat(x) - _flat(y)).pow(2).mean(dim=1)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor,
                 weight: Optional[Tensor] = None) -> Tensor:
    """The normalised distribution-matching direction (float32, NaN-free)."""
    xf = x.detach().float()
    p_real = xf - x0_real.detach().float()
    p_fake = xf - x0_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    norm = p_real.abs().mean(dim=dims, keepdim=True)
    g = (p_real - p_fake) / norm
    if weight is not None:
        g = g * weight.detach().float().reshape((-1,) + (1,) * (x.ndim - 1))
    return torch.nan_to_num(g)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor,
             weight: Optional[Tensor] = None) -> Tensor:
    """½ mean (x − sg(x − g))² per sample, g = :func:`dmd_gradient`."""
    g = dmd_gradient(x, x0_real, x0_fake, weight)
    target = (x.detach().float() - g)
    return 0.5 * (_flat(x) - _flat(target)).pow(2).mean(dim=1)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(−D(G(z))), per sample."""
    return F.softplus(-logits_fake.float()).reshape(logits_fake.shape[0], -1).mean(dim=1)


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> tuple[Tensor, Tensor]:
    """(softplus(−D(x_real)), softplus(D(x_fake))) per sample."""
    r = F.softplus(-logits_real.float()).reshape(logits_real.shape[0], -1).mean(dim=1)
    f = F.softplus(logits_fake.float()).reshape(logits_fake.shape[0], -1).mean(dim=1)
    return r, f


# ----------------------------------------------------------------------------- f-divergences

#: h(r) with r = p_teacher / p_student (f-distill, Xu, Nie & Vahdat 2025, Table 1).
F_DIVERGENCE_WEIGHTS: dict[str, Callable[[Tensor], Tensor]] = {
    "rkl": lambda r: torch.ones_like(r),  # reverse KL: DMD / VSD
    "kl": lambda r: r,  # forward KL
    "js": lambda r: r / (1 + r),  # Jensen-Shannon
    "srkl": lambda r: 1 / (1 + r),  # softened reverse KL
    "sh": lambda r: r.sqrt(),  # squared Hellinger
    "jeffreys": lambda r: 1 + r,
    "neyman": lambda r: 1 / r,  # Neyman chi-squared
}


def f_weight(name: str, r: Tensor) -> Tensor:
    if name not in F_DIVERGENCE_WEIGHTS:
        raise ValueError(f"f-divergence {name!r} is unknown; choose one of "
                         f"{', '.join(F_DIVERGENCE_WEIGHTS)}")
    return F_DIVERGENCE_WEIGHTS[name](r)


def density_ratio(logits: Tensor, logit_clamp: float = 10.0,
                  r_min: float = 0.1, r_max: float = 20.0) -> Tensor:
    """r = exp(D(x)) with the logit clamped to ±``logit_clamp`` and r to [r_min, r_max]."""
    return logits.float().clamp(-logit_clamp, logit_clamp).exp().clamp(r_min, r_max)
