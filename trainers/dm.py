"""Distribution matching: the one component DMD2, f-distill and Hyper-SD's one-step stage share.

Two score networks judge a generator's samples x (Yin et al. 2023, DMD, Eq. 7; DMD2, Yin et
al. 2024, Sec. 3):

* the **real score** — the frozen teacher, with classifier-free guidance;
* the **fake score** — a trainable copy of the teacher that keeps fitting the generator's
  current distribution with the plain denoising loss (the teacher's own target,
  :meth:`~diffdistill.denoiser.Denoiser.target`), updated more often than the generator (the
  two time-scale update rule, DMD2 Sec. 4.1: :func:`ttur_generator_step`). Its timesteps are
  the DM range by default; ``fake_t_range=(0, T−1)`` is what DMD2's public code draws.

Generator loss: t ~ U{t_lo … t_hi}, x_t = α_t x + σ_t ε, p_real = x − x0̂_real(x_t),
p_fake = x − x0̂_fake(x_t), g = h·(p_real − p_fake) / mean|p_real| per sample (h = 1 for DMD2;
f-distill's h(r), Xu et al. 2025, comes in through ``weight_fn``), L_DM = ½‖x − sg(x − g)‖²
(:func:`diffdistill.losses.dmd_loss`).

Optional GAN (DMD2 Sec. 4.3): when the fake score carries a classification head
(:class:`diffdistill.gan.UNetWithHead`), the head's logits from the *same* fake-score forward
as the DM term give the generator's non-saturating loss — so f-distill's density ratio is
read at exactly the x_t it weights — and the discriminator loss on noised real vs generated
samples trains head and fake UNet together with the denoising loss.

Both terms' gradients on x are computed once (``autograd.grad`` on x, which stops at x) and
logged as ``grad_norm_dm`` / ``grad_norm_gan``: a stalled generator shows as a vanishing DM
gradient, and a GAN term that the fixed weight makes negligible shows as a tiny ratio. With
``gan_balance`` = b the GAN gradient is rescaled to b·‖∇ₓL_DM‖ on every batch
(:func:`gan_gradient_scale`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.denoiser import Cond, DenoiserBase
from diffdistill.losses import dmd_loss, gan_discriminator_loss, gan_generator_loss

Tensor = torch.Tensor


def ttur_generator_step(step: int, ratio: int, start: int = 0) -> bool:
    """Two time-scale update rule: the generator moves on every ``ratio``-th step counted
    from ``start`` (the fake score on every step). A function of the global step, so a resumed
    run continues in the right phase."""
    return (step - start) % ratio == 0


def gan_gradient_scale(grad_dm: Tensor, grad_gan: Tensor, weight: float,
                       balance: Optional[float]) -> Tensor:
    """The factor on the generator's GAN gradient: ``weight`` (DMD2's fixed 1e-3 … 5e-3), or
    with ``balance`` = b the factor that makes ‖scale·∇ₓL_G‖ = b·‖∇ₓL_DM‖ on this batch, so
    the adversarial term keeps a set share of the update while the DM gradient's magnitude
    changes over training (which a fixed weight does not)."""
    if balance is None:
        return torch.tensor(float(weight), device=grad_gan.device)
    return (balance * grad_dm.norm() / grad_gan.norm().clamp_min(1e-12)).detach()


class DistributionMatching:
    """Real score, fake score, their two losses and the DM timestep draw.

    ``trainer`` supplies the randomness (``randn``, ``generator``: resumable), ``unwrap`` /
    ``side_pass`` and the backbone; ``real`` is a context-manager factory yielding the real
    score as a denoiser; ``fake_score`` is the prepared fake-score module (a UNet, or a
    :class:`~diffdistill.gan.UNetWithHead` for the GAN term).
    """

    def __init__(self, trainer, *, real: Callable[[], ContextManager[DenoiserBase]],
                 fake_score: nn.Module, t_range: tuple[int, int], guidance_scale: float,
                 compute_dtype: torch.dtype = torch.float32, gan_generator_weight: float = 0.0,
                 gan_discriminator_weight: float = 0.0, gan_balance: Optional[float] = None,
                 weight_fn: Optional[Callable] = None, penalty_fn: Optional[Callable] = None,
                 fake_t_range: Optional[tuple[int, int]] = None):
        self.trainer = trainer
        self.real = real
        self.fake_score = fake_score
        self.t_lo, self.t_hi = t_range
        # the fake score's denoising timesteps (None: the DM range; DMD2's code: [0, T))
        self.fake_t_range = fake_t_range
        self.guidance_scale = guidance_scale
        self.compute_dtype = compute_dtype
        self.gan_generator_weight = gan_generator_weight
        self.gan_discriminator_weight = gan_discriminator_weight
        self.gan_balance = gan_balance
        self.weight_fn = weight_fn  # (x_t, t, logits) -> per-sample h, or None
        self.penalty_fn = penalty_fn  # (x_real_t, t, cond) -> extra discriminator loss

    @property
    def gan(self) -> bool:
        return self.gan_discriminator_weight > 0

    # -- pieces -----------------------------------------------------------------------
    def sample_t(self, n: int, t_range: Optional[tuple[int, int]] = None) -> Tensor:
        """t ~ U{lo … hi} (inclusive; default the DM range) from the trainer's generator."""
        from diffdistill.schedule import sample_uniform_t

        lo, hi = t_range or (self.t_lo, self.t_hi)
        return sample_uniform_t(n, lo, hi, generator=self.trainer.generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.trainer.backbone.schedule.add_noise(x0, noise, t.cpu())

    def fake_denoiser(self, net: nn.Module):
        return self.trainer.backbone.denoiser(net, compute_dtype=self.compute_dtype)

    def logits(self) -> Optional[Tensor]:
        """The head's logits from the fake score's last forward (None without a head)."""
        return getattr(self.trainer.unwrap(self.fake_score), "logits", None)

    # -- the generator's loss -----------------------------------------------------------
    def generator_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, dict]:
        """L_DM (+ the generator's GAN term) on generator samples ``x`` (with grad).

        Call it with the fake score's weights frozen up to the backward
        (:func:`~diffdistill.trainers.common.frozen`): the GAN term's gradient must reach x
        through the fake UNet without accumulating in the fake score's weights."""
        tr = self.trainer
        n = x.shape[0]
        t = self.sample_t(n)
        x_t = self.add_noise(x, tr.randn(*x.shape), t)
        with torch.no_grad(), self.real() as real:
            x0_real = real.guided(x_t.detach(), t, cond, self.guidance_scale).x0
        need_grad = self.gan and self.gan_generator_weight > 0
        with contextlib.nullcontext() if need_grad else torch.no_grad():
            x0_fake = self.fake_denoiser(tr.side_pass(self.fake_score))(
                x_t if need_grad else x_t.detach(), t, cond.replace(uncond=None)).x0
            logits = self.logits() if self.gan else None
        weight = (self.weight_fn(x_t.detach(), t, logits.detach() if logits is not None
                                 else None) if self.weight_fn is not None else None)
        loss_dm = dmd_loss(x, x0_real, x0_fake, weight).mean()
        logs = {"loss_dm": loss_dm.detach()}
        if not x.requires_grad:  # evaluated, not trained: no gradient to measure
            return loss_dm, logs
        (grad_dm,) = torch.autograd.grad(loss_dm, x, retain_graph=True)
        logs["grad_norm_dm"] = grad_dm.norm()
        loss = loss_dm
        if need_grad:
            loss_g = gan_generator_loss(logits).mean()
            (grad_gan,) = torch.autograd.grad(loss_g, x, retain_graph=True)
            scale = gan_gradient_scale(grad_dm, grad_gan, self.gan_generator_weight,
                                       self.gan_balance)
            # x · sg(scale ∇ₓL_G) has the gradient scale·∇L_G on every generator weight; the
            # fake UNet's part of the graph is not run a second time
            loss = loss + (x * (scale * grad_gan).detach()).sum()
            logs.update(loss_gan_generator=loss_g.detach(), gan_scale=scale.detach(),
                        grad_norm_gan=(scale * grad_gan).norm())
        return loss, logs

    # -- the fake score's loss -----------------------------------------------------------
    def fake_score_loss(self, x: Tensor, cond: Cond, x_real: Optional[Tensor] = None
                        ) -> tuple[Tensor, dict]:
        """Denoising loss (the teacher's own target) on detached generator samples, plus the
        discriminator's GAN loss on noised real vs generated samples at the same t."""
        tr = self.trainer
        n = x.shape[0]
        t = self.sample_t(n, self.fake_t_range)
        noise = tr.randn(*x.shape)
        x_t = self.add_noise(x, noise, t)
        den = self.fake_denoiser(self.fake_score)
        plain = cond.replace(uncond=None)
        target = den.target(x, noise, t)
        if not self.gan:
            loss = F.mse_loss(den.raw(x_t, t, plain).float(), target)
            return loss, {"loss_fake_denoise": loss.detach()}
        # One batched forward: generated (denoising + "fake" logits) and real ("real" logits).
        x_real_t = self.add_noise(x_real, tr.randn(*x_real.shape), t)
        raw = den.raw(torch.cat([x_t, x_real_t]), torch.cat([t, t]), Cond.cat([plain, plain]))
        logits_fake, logits_real = self.logits().chunk(2)
        loss_denoise = F.mse_loss(raw[:n].float(), target)
        l_real, l_fake = gan_discriminator_loss(logits_real, logits_fake)
        loss_d = (l_real + l_fake).mean()
        loss = loss_denoise + self.gan_discriminator_weight * loss_d
        logs = {"loss_fake_denoise": loss_denoise.detach(), "loss_gan_discriminator":
                loss_d.detach(), "d_real": logits_real.detach().mean(),
                "d_fake": logits_fake.detach().mean()}
        penalty = self.penalty_fn(x_real_t, t, cond) if self.penalty_fn is not None else None
        if penalty is not None:
            # A penalty of the discriminator (R1) is part of its loss, so it carries the
            # discriminator's weight: γ sets R1 against L_D, as in the papers. Unweighted, it
            # was 1/gan_discriminator_weight (100×) stronger than γ says and pinned the
            # logits near 0, so r = exp(D) ≈ 1 and every f-divergence weighted alike.
            loss = loss + self.gan_discriminator_weight * penalty
            logs["loss_d_penalty"] = penalty.detach()
        return loss, logs

    # -- a held-out measure of the discriminator ------------------------------------------
    @torch.no_grad()
    def discriminator_probe(self, x_real: Tensor, x_fake: Tensor, cond: Cond, t: Tensor,
                            noise_real: Tensor, noise_fake: Tensor) -> dict[str, float]:
        """How well the head tells noised real from noised generated samples that it has not
        been trained on at this step: ROC AUC over the fixed probe (pair i shares t_i), the
        AUC on the lower and upper half of the probe's timesteps, and the mean logits. Only
        for logging: uses no trainer randomness and changes no weight."""
        from diffdistill.gan import roc_auc

        n = x_real.shape[0]
        xr_t = self.add_noise(x_real, noise_real, t)
        xf_t = self.add_noise(x_fake, noise_fake, t)
        plain = cond.replace(uncond=None)
        self.fake_denoiser(self.fake_score).raw(torch.cat([xf_t, xr_t]), torch.cat([t, t]),
                                                Cond.cat([plain, plain]))
        lf, lr = self.logits().float().chunk(2)
        low = t <= t.median()
        out = {"d_auc": roc_auc(lr, lf), "d_logit_real": float(lr.mean()),
               "d_logit_fake": float(lf.mean())}
        if 0 < int(low.sum()) < n:
            low = low.to(lr.device)
            out["d_auc_low_t"] = roc_auc(lr[low], lf[low])
            out["d_auc_high_t"] = roc_auc(lr[~low], lf[~low])
        return out

