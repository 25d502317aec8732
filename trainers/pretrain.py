"""Plain denoising-diffusion training (Ho et al. 2020) — the tool that makes teachers.

Trains the UNet of a local diffusers folder (SD-structured latent text-to-image, or a pixel
class-conditional ``UNet2DModel``) with the ε, v or x0 objective (the folder's own prediction
type, :meth:`~diffdistill.denoiser.Denoiser.target`), t ~ U{0..T−1}, condition dropout for
classifier-free guidance (Ho & Salimans 2022) and optional min-SNR-γ loss weighting (Hang et
al. 2023: :func:`min_snr_weight`).

A rectified-flow teacher (an SD3 folder) trains with the flow-matching loss
‖v̂ − (ε − x0)‖² at x_t = (1 − σ) x0 + σ ε, σ drawn from the logit-normal density
σ = sigmoid(m + s·n), n ~ N(0, 1) (SD3, Esser et al. 2024, Sec. 3.1, Eq. 19; m = 0, s = 1 is
their best), continuous σ (native time t = 1000 σ, the MMDiT's timestep input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.config import BaseConfig, ConfigError

from .base import Trainer
from .common import BackboneMixin


@dataclass
class PretrainSection:
    target: Optional[Literal["epsilon", "v_prediction", "sample"]] = None  # None: the folder's
    cond_dropout: float = 0.1  # probability of training unconditionally (enables CFG)
    min_snr_gamma: Optional[float] = None  # e.g. 5.0 (Hang et al. 2023)
    sample_steps: int = 25  # DDIM steps for the periodic sample grid
    guidance_scale: float = 3.0  # CFG for the sample grid
    logit_mean: float = 0.0  # flow teachers: σ = sigmoid(m + s n) (SD3: m = 0, s = 1)
    logit_std: float = 1.0


@dataclass
class PretrainConfig(BaseConfig):
    pretrain: PretrainSection = field(default_factory=PretrainSection)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.pretrain.cond_dropout < 1.0:
            raise ConfigError("pretrain.cond_dropout must be in [0, 1)")
        if self.pretrain.min_snr_gamma is not None and self.pretrain.min_snr_gamma <= 0:
            raise ConfigError("pretrain.min_snr_gamma must be > 0 (or null to disable)")
        if self.adapter.type != "full":
            raise ConfigError("pretraining trains full weights: set adapter.type=full")
        if self.pretrain.logit_std <= 0:
            raise ConfigError("pretrain.logit_std must be > 0")


def min_snr_weight(schedule, t: torch.Tensor, gamma: float, prediction_type: str
                   ) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, Eq. 6 and its v / x0 forms), float32:
    min(SNR, γ)/SNR for an ε target, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x0."""
    alpha, sigma = (v.float() for v in schedule.alpha_sigma(t.cpu()))
    snr = (alpha / sigma) ** 2
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def logit_normal_sigmas(normal: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """σ = sigmoid(mean + std·n) for standard normal draws ``n``: SD3's logit-normal
    timestep density (Esser et al. 2024, Eq. 19), float64."""
    return torch.sigmoid(mean + std * normal.double())


class PretrainTrainer(BackboneMixin, Trainer):
    method = "pretrain"
    config_class = PretrainConfig
    eval_uses_guidance = True
    trains_flow_transformers = True

    def build(self) -> None:
        cfg = self.cfg
        bb = self.load_backbone()
        if bb.schedule.kind == "flow" and (cfg.pretrain.target is not None
                                           or cfg.pretrain.min_snr_gamma is not None):
            key = "target" if cfg.pretrain.target is not None else "min_snr_gamma"
            raise ConfigError(f"pretrain.{key}: a rectified-flow teacher trains its velocity "
                              "with the flow-matching loss; remove the key")
        if cfg.pretrain.target is not None and cfg.pretrain.target != bb.prediction_type:
            # The trained network's meaning changes: record it in the exported scheduler.
            bb.prediction_type = cfg.pretrain.target
            bb.scheduler_config["prediction_type"] = cfg.pretrain.target
        unet = bb.unet
        unet.requires_grad_(True)
        unet.train()
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = self.add_optimizer("unet", unet)
        self.add_eval_ema("unet", self.unet)

    def train_step(self, batch: dict) -> dict[str, float]:
        p = self.cfg.pretrain
        x0 = self.encode_x0(batch)
        cond = self.cond_for_batch(batch, drop_prob=p.cond_dropout)
        n = x0.shape[0]
        sched = self.backbone.schedule
        if sched.kind == "flow":  # continuous σ, logit-normal (Esser et al. 2024)
            sigma = logit_normal_sigmas(self.randn(n, dtype=torch.float64).cpu(),
                                        p.logit_mean, p.logit_std)
            t = sigma * sched.num_train_timesteps
        else:
            t = self.randint(0, sched.num_train_timesteps, (n,)).double()
        noise = self.randn(*x0.shape)
        xt = sched.add_noise(x0, noise, t.cpu())
        den = self.backbone.denoiser(self.unet)
        pred = den.raw(xt, t.float(), cond).float()
        per_sample = F.mse_loss(pred, den.target(x0, noise, t), reduction="none").mean(
            dim=(1, 2, 3))
        if p.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(sched, t, p.min_snr_gamma,
                                                     den.prediction_type).to(self.device)
        loss = per_sample.mean()
        self.step("unet", loss)
        return {"loss": loss.detach()}

    def generator_unet(self):
        """The network to sample from / export: the EMA copy when EMA is on."""
        return self.ema_or_online("unet", self.unet)

    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        bb = self.backbone
        unet = unet if unet is not None else self.generator_unet()
        return EvalModel(self.method, bb, bb.denoiser(unet), bb.ode_sampler,
                         guidance_scale=self.cfg.eval.guidance_scale)

    def grid_step_counts(self) -> list[int]:
        return [self.cfg.pretrain.sample_steps]

    def grid_spec(self):
        import dataclasses

        return dataclasses.replace(self.eval_spec(),
                                   guidance_scale=self.cfg.pretrain.guidance_scale)

    def export(self, out_dir: Path) -> Optional[Path]:
        from diffdistill.export import save_full_pipeline, write_model_card

        unet = self.generator_unet()
        save_full_pipeline(self.backbone, unet, out_dir, scheduler="teacher")
        write_model_card(out_dir, prompt=self.card_prompt(),
                         method="pretrain", base_model=self.cfg.model.path,
                         steps=50, guidance_scale=self.cfg.pretrain.guidance_scale,
                         scheduler="teacher", lora=False, kind=self.backbone.kind)
        return out_dir
