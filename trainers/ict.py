"""iCT — improved consistency training (Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models", ICLR 2024).

Consistency *training*: no teacher network, the targets come from data. For a clean sample
x0 and one noise draw z, adjacent points of the same trajectory are x_i = x0 + σ_i z and
x_{i+1} = x0 + σ_{i+1} z, and the consistency-training loss with the Sec. 3 changes is

    L = E_i [ λ(σ_i) · d( f_θ(x_{i+1}, σ_{i+1}),  f_θ⁻(x_i, σ_i) ) ]

* θ⁻ = stopgrad(θ): the target is the *online* network without gradient (Sec. 3.2 — the
  EMA teacher of the original CT is the flaw they remove). An EMA of θ is still kept
  (``train.ema_decay``), but only for sampling grids and the export.
* d = pseudo-Huber sqrt(‖x−y‖² + c²) − c with c = 0.00054·√d (Sec. 3.3; d = data
  dimensions, c = 0.03 on CIFAR-10). ``ict.loss`` may pick L2 or LPIPS (the original CT's
  metric, Song et al. 2023) for comparison.
* λ(σ_i) = 1 / (σ_{i+1} − σ_i) (Sec. 3.1).
* σ_i: the Karras grid (σ_min 0.002, σ_max 80, ρ 7) with N(k) points; i is drawn from the
  discretized lognormal (Sec. 3.5, P_mean −1.1, P_std 2.0):
  P(i) ∝ erf((log σ_{i+1} − P_mean)/(√2 P_std)) − erf((log σ_i − P_mean)/(√2 P_std))
  (:func:`diffdistill.schedule.ict_index_probs`).
* N(k) = min(s0·2^⌊k/K′⌋, s1) + 1, K′ = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (Sec. 3.4, s0 10, s1 1280,
  K = ``ict.total_steps``, by default ``train.max_steps``): :func:`ict_num_scales`, a pure
  function of the step, so a resumed run continues the curriculum exactly. Raising
  ``train.max_steps`` on resume stretches the curriculum from then on unless
  ``ict.total_steps`` pins K.
* ``ict.curriculum: ect`` replaces the discrete grid with the continuous-time curriculum of
  ECT (Geng et al. 2024, "Consistency Models Made Easy", Sec. 3, the mapping p(r | t)):
  t ~ lognormal(P_mean, P_std) (clamped to [σ_min, σ_max]), r = t·(1 − n(t)/q^(s+1)) with
  n(t) = 1 + k·sigmoid(−b t), clamped at 0, for stage s = ⌊k_step·S/K⌋ of S stages; the
  target is x0 itself where r ≤ σ_min (f(x, σ_min) = x: the boundary condition), and
  λ = 1/(t − r). Stage 0 is nearly denoising (r = 0 wherever n(t) ≥ q, i.e. small t), and
  each stage halves Δt (q = 2): a scratch run first learns a denoiser in the CM
  parameterisation, then tightens it into a consistency function (:func:`ect_r`,
  :func:`ect_stage`). ECT applies it as tuning from a diffusion model; here it is also the
  curriculum of a scratch run.
* f_θ is the consistency-model parameterisation f = c_skip(σ) x + c_out(σ) F_θ(c_in x, 250 log σ)
  with c_skip = σd²/((σ−σ_min)²+σd²), c_out = σd(σ−σ_min)/sqrt(σ²+σd²), σd = 0.5
  (Song et al. 2023, App. C) — :class:`~diffdistill.denoiser.Denoiser` with
  ``prediction_type="cm"`` on a :class:`~diffdistill.schedule.VESchedule`, exactly what
  diffusers' ``CMStochasticIterativeScheduler`` assumes, so exports sample in stock diffusers.
* Dropout (Sec. 3.1: 0.3 on CIFAR-10) with the *same mask* in the online and the target
  forward: the global RNG state is saved, seeded identically for each of the two forwards
  (the seed comes from the trainer's generator) and restored
  (:meth:`ICTTrainer.online_and_target`). Everything random comes from the trainer's
  generator, so a resumed run continues bit-identically, dropout included.

Initialisation (``ict.init``): ``scratch`` re-initialises the UNet of ``model.path`` (only its
architecture is used) with a seeded init — the paper's setting; ``pretrained`` keeps the
folder's weights (consistency tuning). A scratch run may also widen or deepen that architecture
(``ict.block_out_channels``, ``ict.layers_per_block``): a one-step map from noise to data asks
more of a network than a denoiser used over 50 steps does. A VP ε / v teacher reused this way is read in the CM
parameterisation from step 0, so its first steps re-learn what the output F means (the
architecture and features transfer, the output head does not); expect a short phase where
the loss is high before it falls below what scratch training reaches at the same step.

Networks: pixel class-conditional (or unconditional) ``UNet2DModel`` — the paper's CIFAR-10
/ ImageNet-64 setting — and the text-conditioned ``UNet2DConditionModel`` of an SD / SDXL
structured pipeline trained on VAE latents (LPIPS is pixel-only there).

Sampling: one step x0̂ = f(σ_max z, σ_max); two steps (Song et al. 2023, Alg. 1) re-noise
to σ_mid and apply f again — the shared :func:`~diffdistill.sampling.sample_lcm` on the VE
schedule. σ_mid sits on the 40-point Karras grid of the exported scheduler
(``ict.two_step_index``; index 24 gives σ ≈ 0.82, the paper's 0.821 for CIFAR-10).

Export (full weights, the EMA when there is one):

* pixel → a stock ``ConsistencyModelPipeline`` folder (``CMStochasticIterativeScheduler``):
  ``DiffusionPipeline.from_pretrained(dir)(class_labels=[...], num_inference_steps=1)`` or
  ``timesteps=[two_step_index, 0]`` for two steps, giving the trainer's own samples.
* latent → a stock ``StableDiffusionPipeline`` (/ XL) folder whose scheduler is
  ``CMStochasticIterativeScheduler`` with ``clip_denoised=False``. No dedicated latent CM
  pipeline exists in diffusers, but none is needed: the stock SD pipeline calls
  ``scale_model_input`` (c_in), passes the scheduler's timesteps (250·log σ) to the UNet and
  lets ``step`` apply the CM boundary condition and re-noising, which is exactly CM
  sampling (the tests compare it with our sampler). Sample it with guidance_scale=1: iCT
  trains no unconditional branch. ``diffdistill sample`` reads it too (the backbone loader
  recognises the CM scheduler).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond
from diffdistill.losses import ict_huber_c, l2, pseudo_huber
from diffdistill.schedule import VESchedule, ict_index_probs, karras_sigmas, sample_ict_indices

from .base import Trainer
from .common import BackboneMixin

#: points of the Karras grid of diffusers' CMStochasticIterativeScheduler (its configs' value)
CM_GRID_POINTS = 40


# ----------------------------------------------------------------------------- the math


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Discretisation curriculum N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 (iCT Sec. 3.4).

    K′ = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ with K = ``total_steps``. Runs shorter than log2⌊s1/s0⌋ + 1
    steps would give K′ = 0; K′ is then 1 (N doubles every step), the only reading that
    keeps N(k) defined.
    """
    if step < 0 or total_steps < 1 or s0 < 1 or s1 < s0:
        raise ValueError(f"need step >= 0, total_steps >= 1, 1 <= s0 <= s1; got "
                         f"{step}, {total_steps}, {s0}, {s1}")
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    doublings = min(step // k_prime, 64)  # past the cap anyway; keeps 2**d small
    return min(s0 * 2**doublings, s1) + 1


def ect_stage(step: int, total_steps: int, stages: int) -> int:
    """ECT's stage s = ⌊step·S/K⌋, capped at S − 1 (S stages over K steps)."""
    if step < 0 or total_steps < 1 or stages < 1:
        raise ValueError(f"need step >= 0, total_steps >= 1, stages >= 1; got "
                         f"{step}, {total_steps}, {stages}")
    return min(step * stages // total_steps, stages - 1)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0
          ) -> torch.Tensor:
    """ECT's mapping r(t) = max(0, t·(1 − n(t)/q^(stage+1))), n(t) = 1 + k·sigmoid(−b t)
    (Geng et al. 2024, Sec. 3: Δt = t − r shrinks by q per stage, more at small t)."""
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - n / q ** (stage + 1))).clamp(min=0.0)


def ict_loss_weight(sigma_cur: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """λ(σ_i) = 1 / (σ_{i+1} − σ_i) (iCT Sec. 3.1)."""
    return 1.0 / (sigma_next - sigma_cur)


def cm_grid_sigmas(indices, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0, points: int = CM_GRID_POINTS) -> torch.Tensor:
    """σ at ``indices`` of the stock CM scheduler's Karras grid (index 0 = σ_max), float64.

    ``ConsistencyModelPipeline(timesteps=[j, 0])`` samples at σ(0) then σ(j); this returns
    the same noise levels for our sampler.
    """
    grid = karras_sigmas(points, sigma_min, sigma_max, rho)  # descending: grid[0] = σ_max
    return grid[torch.as_tensor(list(indices), dtype=torch.long)]


# ----------------------------------------------------------------------------- config


@dataclass
class ICTSection:
    init: Literal["scratch", "pretrained"] = "scratch"  # paper: scratch; pretrained = tuning
    loss: Literal["pseudo_huber", "l2", "lpips"] = "pseudo_huber"  # Sec. 3.3: pseudo-Huber
    huber_c: float | None = None  # None: 0.00054·sqrt(d) (Sec. 3.3; 0.03 on CIFAR-10)
    lpips_net: Literal["alex", "vgg"] = "vgg"  # the CM code's LPIPS is VGG-16 based
    lpips_weights: str | None = None  # local torchvision alexnet/vgg16 state dict file
    lpips_resize: int = 224  # CM code: bilinear upsampling to 224 px below 256 px (0: off)
    sigma_min: float = 0.002  # Karras grid (EDM; iCT Sec. 2)
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5  # CM boundary condition (Song et al. 2023, App. C)
    p_mean: float = -1.1  # discretized lognormal (Sec. 3.5) — note the sign
    p_std: float = 2.0
    s0: int = 10  # curriculum N(k) (Sec. 3.4)
    s1: int = 1280
    total_steps: int | None = None  # K of N(k); None: train.max_steps (pin it to extend a run)
    dropout: float | None = None  # None: the UNet config's; paper 0.3 (CIFAR-10)
    # scratch only — the architecture of model.path with these changed (None: the folder's)
    block_out_channels: list[int] | None = None  # e.g. [32, 64, 128, 128]: a wider net
    layers_per_block: int | None = None
    two_step_index: int | None = None  # σ_mid on the 40-point CM grid; None: stock (20)
    # "discrete": iCT's N(k) grid; "ect": ECT's continuous t and r(t) (module docstring)
    curriculum: Literal["discrete", "ect"] = "discrete"
    ect_stages: int = 8  # S: stages over K steps; Δt shrinks by ect_q per stage
    ect_q: float = 2.0
    ect_k: float = 8.0  # n(t) = 1 + k·sigmoid(−b t)
    ect_b: float = 1.0


@dataclass
class ICTConfig(BaseConfig):
    ict: ICTSection = field(default_factory=ICTSection)

    def validate(self) -> None:
        super().validate()
        c = self.ict
        if not 0 < c.sigma_min < c.sigma_max:
            raise ConfigError(f"ict.sigma_min/ict.sigma_max: need 0 < sigma_min < sigma_max, "
                              f"got {c.sigma_min}, {c.sigma_max}")
        if c.rho <= 0:
            raise ConfigError(f"ict.rho must be > 0, got {c.rho}")
        if c.sigma_data <= 0:
            raise ConfigError(f"ict.sigma_data must be > 0, got {c.sigma_data}")
        if c.p_std <= 0:
            raise ConfigError(f"ict.p_std must be > 0, got {c.p_std}")
        if c.s0 < 1 or c.s1 < c.s0:
            raise ConfigError(f"ict.s0/ict.s1: need 1 <= s0 <= s1, got {c.s0}, {c.s1}")
        if c.total_steps is not None and c.total_steps < 1:
            raise ConfigError(f"ict.total_steps must be >= 1 (or null), got {c.total_steps}")
        if c.huber_c is not None and c.huber_c <= 0:
            raise ConfigError(f"ict.huber_c must be > 0 (or null for 0.00054·sqrt(d)), "
                              f"got {c.huber_c}")
        if c.dropout is not None and not 0.0 <= c.dropout < 1.0:
            raise ConfigError(f"ict.dropout must be in [0, 1) (or null), got {c.dropout}")
        if c.init != "scratch" and (c.block_out_channels or c.layers_per_block):
            raise ConfigError("ict.block_out_channels / ict.layers_per_block change the "
                              "architecture, which only ict.init=scratch can: set "
                              "ict.init=scratch or leave them null")
        if c.block_out_channels is not None and min(c.block_out_channels, default=0) < 1:
            raise ConfigError(f"ict.block_out_channels must be positive widths, got "
                              f"{c.block_out_channels}")
        if c.layers_per_block is not None and c.layers_per_block < 1:
            raise ConfigError(f"ict.layers_per_block must be >= 1, got {c.layers_per_block}")
        if c.two_step_index is not None and not 0 < c.two_step_index < CM_GRID_POINTS:
            raise ConfigError(f"ict.two_step_index must lie in 1..{CM_GRID_POINTS - 1} (an "
                              f"index of the stock CM scheduler's grid), got {c.two_step_index}")
        if c.ect_stages < 1 or c.ect_q <= 1 or c.ect_k < 0 or c.ect_b <= 0:
            raise ConfigError(f"ict.ect_*: need ect_stages >= 1, ect_q > 1, ect_k >= 0, "
                              f"ect_b > 0; got {c.ect_stages}, {c.ect_q}, {c.ect_k}, "
                              f"{c.ect_b}")
        if c.lpips_resize < 0:
            raise ConfigError(f"ict.lpips_resize must be >= 0, got {c.lpips_resize}")
        if c.loss == "lpips" and not (c.lpips_weights or os.environ.get(_LPIPS_ENV)):
            raise ConfigError(
                f"ict.loss=lpips needs the LPIPS backbone weights: set ict.lpips_weights to a "
                f"local torchvision {c.lpips_net} state dict (or {_LPIPS_ENV}); nothing is "
                f"downloaded")
        if self.adapter.type == "lora" and c.init == "scratch":
            raise ConfigError("adapter.type=lora freezes the base weights, which ict.init="
                              "scratch re-initialises at random: use adapter.type=full, or "
                              "ict.init=pretrained for LoRA consistency tuning")


_LPIPS_ENV = "DIFFDISTILL_LPIPS_BACKBONE"


# ----------------------------------------------------------------------------- trainer


class ICTTrainer(BackboneMixin, Trainer):
    method = "ict"
    config_class = ICTConfig
    resume_must_match = Trainer.resume_must_match + (
        "ict.init", "ict.s0", "ict.s1", "ict.block_out_channels", "ict.layers_per_block",
        "ict.curriculum", "ict.ect_stages", "ict.ect_q", "ict.ect_k", "ict.ect_b")

    def build(self) -> None:
        cfg, c = self.cfg, self.cfg.ict
        bb = self.load_backbone()
        if c.loss == "lpips" and bb.kind != "pixel":
            raise ConfigError("ict.loss=lpips compares images; this is a latent model: use "
                              "ict.loss=pseudo_huber or l2")
        unet = self._student_unet(bb.unet)
        from diffdistill.adapters import make_trainable, set_attention_backend

        set_attention_backend(unet, cfg.model.attention)
        make_trainable(unet, **self.adapter_kwargs())
        # The student speaks the CM parameterisation on a VE schedule, whatever the folder's
        # scheduler was: a view of the backbone with that schedule (VAE, text encoders and
        # class handling unchanged) serves the sampler and the export.
        sched_cfg = {"_class_name": "CMStochasticIterativeScheduler",
                     "num_train_timesteps": CM_GRID_POINTS, "sigma_min": c.sigma_min,
                     "sigma_max": c.sigma_max, "sigma_data": c.sigma_data, "rho": c.rho,
                     "s_noise": 1.0, "clip_denoised": bb.kind == "pixel"}
        self.backbone = dataclasses.replace(
            bb, unet=unet, schedule=VESchedule(c.sigma_min, c.sigma_max),
            prediction_type="cm", scheduler_config=sched_cfg)
        del bb
        self.unet = self.add_optimizer("unet", unet)
        self.add_eval_ema("unet", self.unet)  # for evaluation and export only, never the target
        self.student = self.backbone.denoiser(self.unet)  # online (prepared: DDP) network
        # same weights, run outside the update (no DDP reduction; FSDP's wrapper kept)
        self.target = self.backbone.denoiser(self.side_pass(self.unet))
        self.lpips = self._build_lpips() if c.loss == "lpips" else None

    def _student_unet(self, unet):
        """The folder's UNet, rebuilt with ``ict.dropout`` and/or re-initialised (scratch),
        with the widths / depth of ``ict.block_out_channels`` / ``ict.layers_per_block``."""
        c = self.cfg.ict
        if c.dropout is None and c.init == "pretrained":
            return unet
        config = dict(unet.config)
        changes = {"dropout": c.dropout, "block_out_channels": c.block_out_channels,
                   "layers_per_block": c.layers_per_block}
        for key, value in changes.items():
            if value is None:
                continue
            if key not in config:
                raise ConfigError(f"ict.{key}: {type(unet).__name__} has no {key} setting")
            if key == "block_out_channels" and len(value) != len(config[key]):
                raise ConfigError(f"ict.block_out_channels: the folder's UNet has "
                                  f"{len(config[key])} blocks, got {len(value)} widths")
            config[key] = list(value) if isinstance(value, list) else value
        groups = config.get("norm_num_groups")
        if groups and any(w % groups for w in config.get("block_out_channels", ())):
            raise ConfigError(f"ict.block_out_channels: every width must be a multiple of the "
                              f"UNet's norm_num_groups ({groups}), got "
                              f"{config['block_out_channels']}")
        # A seeded init independent of whatever drew from the global RNG before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            new = type(unet).from_config(config)
        if c.init == "pretrained":
            new.load_state_dict(unet.state_dict())
        return new.to(self.device, torch.float32)

    def _build_lpips(self):
        from diffdistill.eval.lpips_metric import LPIPSMetric

        c = self.cfg.ict
        try:
            metric = LPIPSMetric(net=c.lpips_net, weights_path=c.lpips_weights,
                                 device=self.device)
        except FileNotFoundError as e:
            raise ConfigError(f"ict.lpips_weights: {e}") from None
        return metric.model  # lpips.LPIPS: differentiable in its inputs, weights frozen

    # -- the pieces of one step (public so that tests can check each) -----------------
    def num_scales(self, step: int | None = None) -> int:
        """N(k) at ``step`` (default: the current step)."""
        c = self.cfg.ict
        return ict_num_scales(self.global_step if step is None else step,
                              c.total_steps or self.cfg.train.max_steps, c.s0, c.s1)

    def ect_stage(self, step: int | None = None) -> int:
        """ECT's stage at ``step`` (default: the current step)."""
        c = self.cfg.ict
        return ect_stage(self.global_step if step is None else step,
                         c.total_steps or self.cfg.train.max_steps, c.ect_stages)

    def draw_ect_sigmas(self, n: int, step: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t) per sample: t lognormal in [σ_min, σ_max], r = :func:`ect_r` (float64)."""
        c = self.cfg.ict
        z = torch.randn(n, generator=self.generator, dtype=torch.float64)
        t = (c.p_mean + c.p_std * z).exp().clamp(c.sigma_min, c.sigma_max)
        return ect_r(t, self.ect_stage(step), c.ect_q, c.ect_k, c.ect_b), t

    def grid(self, step: int | None = None) -> torch.Tensor:
        """The ascending Karras grid σ_1 < ... < σ_N(k) of step ``step`` (float64)."""
        c = self.cfg.ict
        return karras_sigmas(self.num_scales(step), c.sigma_min, c.sigma_max, c.rho,
                             descending=False)

    def index_probs(self, sigmas: torch.Tensor) -> torch.Tensor:
        return ict_index_probs(sigmas, self.cfg.ict.p_mean, self.cfg.ict.p_std)

    def draw_sigmas(self, n: int, step: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_i, σ_{i+1}) per sample, i from the discretized lognormal (float64, CPU)."""
        sigmas = self.grid(step)
        i = sample_ict_indices(self.index_probs(sigmas), n, generator=self.generator)
        return sigmas[i], sigmas[i + 1]

    def online_and_target(self, x_next: torch.Tensor, sigma_next: torch.Tensor,
                          x_cur: torch.Tensor, sigma_cur: torch.Tensor, cond: Cond
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """f_θ(x_{i+1}, σ_{i+1}) with gradient and sg(f_θ(x_i, σ_i)), one dropout mask.

        Dropout draws from the global RNG. Both forwards run inside a fork of it (saved and
        restored around each), seeded with the same number drawn from the trainer's
        generator, so they see identical masks, the global state is left untouched, and the
        masks are a function of the saved generator alone: a resumed run replays them even
        though other code (e.g. a DataLoader starting) draws from the global RNG.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            online = self.student(x_next, sigma_next, cond).x0
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            target = self.target(x_cur, sigma_cur, cond).x0
        return online, target.detach()

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y) per sample: pseudo-Huber (default), L2 or LPIPS."""
        c = self.cfg.ict
        if c.loss == "pseudo_huber":
            return pseudo_huber(x, y, c.huber_c if c.huber_c is not None else ict_huber_c(x))
        if c.loss == "l2":
            return l2(x, y)
        if c.lpips_resize and x.shape[-1] < 256:  # as the CM code does for small images
            size = (c.lpips_resize, c.lpips_resize)
            x = F.interpolate(x.float(), size=size, mode="bilinear")
            y = F.interpolate(y.float(), size=size, mode="bilinear")
        return self.lpips(x.float(), y.float()).reshape(x.shape[0])

    def consistency_loss(self, batch: dict) -> torch.Tensor:
        """mean_b λ(σ_i) d(f_θ(x_{i+1}, σ_{i+1}), sg f_θ(x_i, σ_i)) for one batch."""
        x0 = self.encode_x0(batch).float()
        cond = self.cond_for_batch(batch)
        n = x0.shape[0]
        ect = self.cfg.ict.curriculum == "ect"
        sigma_cur, sigma_next = self.draw_ect_sigmas(n) if ect else self.draw_sigmas(n)
        noise = self.randn(*x0.shape)
        shape = (n,) + (1,) * (x0.ndim - 1)
        s_cur = sigma_cur.to(self.device, torch.float32).reshape(shape)
        s_next = sigma_next.to(self.device, torch.float32).reshape(shape)
        # ECT's r may fall below σ_min (to 0): there the target is x0 (the boundary condition);
        # the target network then runs at σ_min, where the CM parameterisation is defined.
        weight = ict_loss_weight(sigma_cur, sigma_next).to(self.device, torch.float32)
        at_boundary = sigma_cur <= self.cfg.ict.sigma_min
        online, target = self.online_and_target(
            x0 + s_next * noise, sigma_next, x0 + s_cur * noise,
            sigma_cur.clamp(min=self.cfg.ict.sigma_min), cond)
        if ect and bool(at_boundary.any()):
            target = torch.where(at_boundary.to(self.device).reshape(shape), x0, target)
        return (weight * self.distance(online, target)).mean()

    def train_step(self, batch: dict) -> dict[str, float]:
        loss = self.consistency_loss(batch)
        self.step("unet", loss)
        if self.cfg.ict.curriculum == "ect":
            return {"loss": loss.detach(), "ect_stage": self.ect_stage()}
        return {"loss": loss.detach(), "num_scales": self.num_scales()}

    # -- sampling and export ----------------------------------------------------------
    def generator_unet(self):
        """The network to sample from / export: the EMA copy when EMA is on."""
        return self.ema_or_online("unet", self.unet)

    def two_step_sigmas(self) -> torch.Tensor:
        c = self.cfg.ict
        j = c.two_step_index if c.two_step_index is not None else CM_GRID_POINTS // 2
        return cm_grid_sigmas([0, j], c.sigma_min, c.sigma_max, c.rho)

    def eval_spec(self, unet: nn.Module | None = None):
        from diffdistill.eval.eval_model import EvalModel

        bb = self.backbone
        return EvalModel(self.method, bb, bb.denoiser(unet if unet is not None else self.generator_unet()), "cm",
                         timesteps=lambda n: self.two_step_sigmas() if n == 2 else None,
                         sampler_opts={"clip_denoised": bb.kind == "pixel"})

    def grid_step_counts(self) -> list[int]:
        return [1, 2]  # the 1-step row, then the trained 2-step grid

    def export(self, out_dir: Path) -> Path | None:
        from diffdistill.export import save_full_pipeline, write_export_info, write_model_card

        c, bb = self.cfg.ict, self.backbone
        unet = self.generator_unet()
        save_full_pipeline(bb, unet, out_dir, scheduler="cm")
        j = c.two_step_index if c.two_step_index is not None else CM_GRID_POINTS // 2
        two = [float(s) for s in self.two_step_sigmas()]
        sigma_mid = two[1]
        # what `diffdistill sample` / `bench` read: 1 step from σ_max, the trained 2-step grid
        write_export_info(out_dir, **self.eval_spec(unet).export_info(1, [2]), method=self.method)
        same = " = `num_inference_steps=2`" if j == CM_GRID_POINTS // 2 else ""
        extra = {
            "two-step sampling": f"`pipe(..., num_inference_steps=None, timesteps=[{j}, 0])`"
                                 f"{same} (σ_mid = {sigma_mid:.4g})",
            "initialisation": c.init, "loss": c.loss,
            "EMA decay (export)": self.cfg.train.ema_decay,
            "curriculum": (f"ECT: {c.ect_stages} stages, q={c.ect_q}, k={c.ect_k}, b={c.ect_b}"
                           if c.curriculum == "ect" else f"s0={c.s0}, s1={c.s1}")
                          + f", K={c.total_steps or self.cfg.train.max_steps}",
            "parameterisation": f"CM (σ_min={c.sigma_min}, σ_max={c.sigma_max}, "
                                f"σ_data={c.sigma_data})",
        }
        if bb.kind != "pixel":
            extra["note"] = ("stock StableDiffusion pipeline with CMStochasticIterativeScheduler"
                             "; sample with guidance_scale=1 (no unconditional branch trained)")
        write_model_card(out_dir, prompt=self.card_prompt(),
                         method="ict", base_model=self.cfg.model.path, steps=1,
                         guidance_scale=1.0, scheduler="cm", lora=False, kind=bb.kind,
                         extra=extra)
        return out_dir


__all__ = [
    "CM_GRID_POINTS",
    "ICTConfig",
    "ICTSection",
    "ICTTrainer",
    "cm_grid_sigmas",
    "ect_r",
    "ect_stage",
    "ict_loss_weight",
    "ict_num_scales",
]
