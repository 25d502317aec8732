"""f-distill — One-step Diffusion Models with f-Divergence Distribution Matching
(Xu, Nie & Vahdat 2025, arXiv:2502.15681).

DMD2's generator update (:mod:`diffdistill.trainers.dmd2`) with the score difference of each
sample weighted by h(r) (Eq. 9: ∇θ D_f = E[ h(r(x_t)) (s_fake − s_real) ∂x_t/∂θ ]), where
r = p_teacher / p_student is the density ratio of the noised distributions, read off the GAN
discriminator: r = exp(D(x_t, t)) with the logit clamped to ±``logit_clamp`` and r to
[``ratio_min``, ``ratio_max``] (Sec. 4; 10, [0.1, 20] by default). h per divergence (Table 1):
reverse-KL 1 (= DMD2 exactly), forward-KL r, Jensen–Shannon r/(1+r), softened RKL 1/(1+r),
squared Hellinger √r, Jeffreys 1+r, Neyman χ² 1/r (:data:`diffdistill.losses.F_DIVERGENCE_WEIGHTS`).

Stabilisers (Sec. 4, "variance reduction"):

* r is divided by a running mean of r per timestep bin (``ratio_bins`` equal bins of
  [0, T), EMA rate ``ratio_ema``; a bin's first batch initialises it). The per-bin sums and
  counts are all-reduced before the update, so every process holds the same statistics;
  they live in ``state_tensors`` and are saved in checkpoints.
* h is divided by its mean over the global batch (all processes), so the step size does not
  depend on the divergence's scale.

The discriminator (the GAN head on the fake score's bottleneck) must be trained — the config
rejects GAN weights of 0 — and may carry an R1 penalty (Mescheder et al. 2018),
γ/2·E‖∇_x D(x_real_t)‖², on the noised real samples (Table 5: γ = 1 CIFAR-10 / SD, 0 IN-64).
R1 differentiates through the UNet twice; fused attention kernels (flash, xformers) have no
double backward, so that forward runs PyTorch's math attention, without activation
checkpointing.

The weighting is DMD2's :meth:`~diffdistill.trainers.dmd2.DMD2Trainer.dm_weight` hook and
R1 its :meth:`~diffdistill.trainers.dmd2.DMD2Trainer.discriminator_penalty` hook; everything
else (networks, update order, sampling, export) is DMD2's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from diffdistill.config import ConfigError
from diffdistill.denoiser import Cond
from diffdistill.losses import density_ratio, f_weight

from .dmd2 import DMD2Config, DMD2Trainer

Tensor = torch.Tensor

Divergence = Literal["rkl", "kl", "js", "srkl", "sh", "jeffreys", "neyman"]


@dataclass
class FDistillSection:
    divergence: Divergence = "js"  # JS: best on IN-64 / COCO in the paper (Tables 2, 3)
    logit_clamp: float = 10.0  # |D(x_t)| <= 10 before exp (paper)
    ratio_min: float = 0.1  # r clamped to [0.1, 20] (paper)
    ratio_max: float = 20.0
    normalize_ratio: bool = True  # r / running mean of r in its timestep bin
    ratio_bins: int = 10  # timestep bins for the running mean (paper: 10)
    ratio_ema: float = 0.9  # EMA rate of the bin means (our default; not given in the paper)
    normalize_weight: bool = True  # h / mean(h) over the global batch
    # R1 on noised real samples, γ/2·‖∇ₓD‖² added to the discriminator's loss (and so
    # weighted with it by dmd2.gan_discriminator_weight): 1 (CIFAR-10, SD1.5), 0 (IN-64)
    r1_gamma: float = 0.0


@dataclass
class FDistillConfig(DMD2Config):
    fdistill: FDistillSection = field(default_factory=FDistillSection)

    def validate(self) -> None:
        super().validate()
        f, d = self.fdistill, self.dmd2
        if d.gan_discriminator_weight <= 0 or d.gan_generator_weight <= 0:
            raise ConfigError(
                "f-distill needs the GAN: its discriminator gives the density ratio r = "
                "exp(D(x_t)) that weights the score difference. Set "
                "dmd2.gan_discriminator_weight > 0 (1e-2) and dmd2.gan_generator_weight > 0 "
                "(paper: 1e-3 SD1.5, 3e-3 ImageNet-64)")
        if f.logit_clamp <= 0:
            raise ConfigError("fdistill.logit_clamp must be > 0")
        if not 0 < f.ratio_min < f.ratio_max:
            raise ConfigError(f"fdistill.ratio_min/ratio_max must satisfy 0 < min < max, got "
                              f"{f.ratio_min}, {f.ratio_max}")
        if f.ratio_bins < 1:
            raise ConfigError("fdistill.ratio_bins must be >= 1")
        if not 0.0 <= f.ratio_ema < 1.0:
            raise ConfigError(f"fdistill.ratio_ema must be in [0, 1), got {f.ratio_ema}")
        if f.r1_gamma < 0:
            raise ConfigError("fdistill.r1_gamma must be >= 0")


# ----------------------------------------------------------------------------- statistics


def timestep_bins(t: Tensor, num_bins: int, num_train_timesteps: int) -> Tensor:
    """Bin index of each t: ``num_bins`` equal bins over [0, T)."""
    b = torch.floor(t.double() * num_bins / num_train_timesteps).long()
    return b.clamp(0, num_bins - 1)


def bin_sums(bins: Tensor, values: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """(sum of values, count) per bin, float64 on the values' device."""
    s = torch.zeros(num_bins, dtype=torch.float64, device=values.device)
    c = torch.zeros(num_bins, dtype=torch.float64, device=values.device)
    b = bins.to(values.device)
    s.index_add_(0, b, values.double())
    c.index_add_(0, b, torch.ones_like(values, dtype=torch.float64))
    return s, c


def update_bin_means(mean: Tensor, count: Tensor, sums: Tensor, counts: Tensor,
                     ema: float) -> tuple[Tensor, Tensor]:
    """EMA of each bin's batch mean: m ← ema·m + (1−ema)·batch mean where the batch has
    samples in the bin; a bin's first batch sets m to its batch mean. Returns (mean, count)."""
    present = counts > 0
    batch_mean = sums / counts.clamp_min(1)
    updated = torch.where(count > 0, ema * mean + (1 - ema) * batch_mean, batch_mean)
    return torch.where(present, updated, mean), count + counts


def normalise_mean_one(h: Tensor, total_sum: Tensor, total_count: Tensor) -> Tensor:
    """h / (global mean of h), the global mean given as (sum, count) over all processes."""
    return h / (total_sum / total_count).to(h.dtype)


# ----------------------------------------------------------------------------- trainer


class FDistillTrainer(DMD2Trainer):
    method = "fdistill"
    config_class = FDistillConfig

    MEAN_KEY = "fdistill.ratio_bin_mean"
    COUNT_KEY = "fdistill.ratio_bin_count"

    def fsdp_unsupported(self) -> Optional[str]:
        if self.cfg.fdistill.r1_gamma > 0:
            return (f"fdistill.r1_gamma={self.cfg.fdistill.r1_gamma}: the R1 penalty "
                    "differentiates twice through the fake score, which FSDP does not support; "
                    "set fdistill.r1_gamma=0 or use configs/accelerate/multi_gpu.yaml")
        return super().fsdp_unsupported()

    def needs_discriminator(self) -> bool:
        return True  # the density ratio r = D / (1 − D) comes from the head

    def build(self) -> None:
        super().build()
        f = self.cfg.fdistill
        self.state_tensors[self.MEAN_KEY] = torch.ones(f.ratio_bins, dtype=torch.float64)
        self.state_tensors[self.COUNT_KEY] = torch.zeros(f.ratio_bins, dtype=torch.float64)
        if f.r1_gamma > 0:
            from diffdistill.adapters import set_attention_backend

            set_attention_backend(self.unwrap(self.fake_score).unet, "sdpa")  # see docstring
        self._fd_logs: dict = {}

    def _all_sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return self.accelerator.reduce(x.to(self.device).clone(), reduction="sum").to(x.device)

    # -- the DMD2 hooks ---------------------------------------------------------------
    def dm_weight(self, x_t: Tensor, t: Tensor, logits: Optional[Tensor]) -> Optional[Tensor]:
        f = self.cfg.fdistill
        r = density_ratio(logits, f.logit_clamp, f.ratio_min, f.ratio_max)
        logs = {"ratio_mean": r.mean().detach()}
        if f.normalize_ratio:
            bins = timestep_bins(t, f.ratio_bins, self.T)
            sums, counts = bin_sums(bins, r.detach().cpu(), f.ratio_bins)
            sums, counts = self._all_sum(sums), self._all_sum(counts)
            mean, count = update_bin_means(self.state_tensors[self.MEAN_KEY],
                                           self.state_tensors[self.COUNT_KEY], sums, counts,
                                           f.ratio_ema)
            self.state_tensors[self.MEAN_KEY], self.state_tensors[self.COUNT_KEY] = mean, count
            r = r / mean[bins].to(r.device, r.dtype)
        h = f_weight(f.divergence, r)
        if f.normalize_weight:
            tot = self._all_sum(torch.stack([h.double().sum(), torch.tensor(
                float(h.numel()), dtype=torch.float64, device=h.device)]))
            h = normalise_mean_one(h, tot[0], tot[1])
        logs.update(h_min=h.min().detach(), h_max=h.max().detach())
        self._fd_logs = logs
        return h

    def discriminator_penalty(self, x_real_t: Tensor, t: Tensor, cond: Cond) -> Optional[Tensor]:
        gamma = self.cfg.fdistill.r1_gamma
        if gamma <= 0:
            return None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fake = self.unwrap(self.fake_score)
        x = x_real_t.detach().requires_grad_(True)
        # No activation checkpointing in this forward: its recomputation would run the
        # default (fused) attention and no longer match the math kernel's saved tensors.
        checkpointing = fake.unet.is_gradient_checkpointing
        if checkpointing:
            fake.unet.disable_gradient_checkpointing()
        try:
            # eager even under train.compile: a compiled (AOTAutograd) backward is not itself
            # differentiable, and R1 differentiates twice
            with sdpa_kernel([SDPBackend.MATH]), torch.compiler.set_stance("force_eager"):
                self.denoiser(fake).raw(x, t, cond)
                logits = fake.logits
        finally:
            if checkpointing:
                fake.unet.enable_gradient_checkpointing()
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return 0.5 * gamma * grad.float().pow(2).flatten(1).sum(1).mean()

    def train_step(self, batch: dict) -> dict[str, float]:
        self._fd_logs = {}
        logs = super().train_step(batch)
        logs.update(self._fd_logs)
        return logs

    @torch.no_grad()
    def verify_replicas(self) -> None:
        """Weights and the ratio statistics must be identical on every process."""
        super().verify_replicas()
        if self.world == 1:
            return
        st = torch.cat([self.state_tensors[self.MEAN_KEY], self.state_tensors[self.COUNT_KEY]])
        every = self.accelerator.gather(st.to(self.device).reshape(1, -1))
        if not torch.equal(every, every[:1].expand_as(every)):
            raise RuntimeError(f"f-distill ratio statistics differ across processes: "
                               f"{every.tolist()}")
