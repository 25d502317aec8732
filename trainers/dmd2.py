"""DMD2 — Improved Distribution Matching Distillation (Yin et al. 2024, arXiv:2405.14867).

Three networks that all speak the :class:`~diffdistill.denoiser.Denoiser` interface:

* generator G (initialised from the teacher; full weights or a LoRA "generator" adapter),
  mapping x_{t_k} at fixed timesteps t_k to x0̂ in the teacher's own parameterisation;
* real score μ_real — the frozen teacher with classifier-free guidance (``dmd2.guidance_scale``);
* fake score μ_fake — a trainable copy of the teacher (full or LoRA "fake_score"), trained with
  the plain denoising loss (the teacher's ε / v / x0 target) on detached generator samples.

Generator loss, distribution matching (DMD, Yin et al. 2023, Eq. 7; DMD2 Sec. 3 and the
public code's normalisation): t ~ U{0.02T … 0.98T}, x_t = α_t x + σ_t ε,
p_real = x − x0̂_real(x_t), p_fake = x − x0̂_fake(x_t), g = (p_real − p_fake) / mean|p_real|
(per sample), L_DM = ½‖x − sg(x − h·g)‖² (:func:`diffdistill.losses.dmd_loss`, float32; the
teacher's x0 arithmetic runs in ``dmd2.x0_dtype``). The per-sample weight h comes from the
:meth:`DMD2Trainer.dm_weight` hook: None here (h = 1); f-distill overrides it with h(r).

Two time-scale update rule (DMD2 Sec. 4.1): every global step updates the fake score; every
``fake_updates_per_generator_update``-th step (global_step % ratio == 0) updates the
generator first. The phase is a function of the global step, so a resumed run continues in
the right phase.

GAN (DMD2 Sec. 4.3): a classification head on the fake-score UNet's bottleneck features
(forward hook, :mod:`diffdistill.gan`), non-saturating softplus loss. The discriminator sees
noised real images (the training data, hence required) and noised generator samples at the
same t; its loss (weight ``gan_discriminator_weight``) trains the head and the fake UNet with
the fake-score optimizer. The generator's term (weight ``gan_generator_weight``) uses the
logits of the same fake-score forward as the DM loss (the DM's x_t), so f-distill's density
ratio is read at exactly the x_t it weights; DMD2's public code draws a separate t for it.

Multi-step (DMD2 Sec. 4.4): ``dmd2.timesteps`` (e.g. [999, 749, 499, 249]); each sample
draws a step k; with *backward simulation* its input is produced by the student's own chain
from pure noise (x0̂ = G(x, t_j), re-noised to t_{j+1} with fresh noise, as LCM sampling does),
without it by noising a real image to t_k. One step: ``timesteps: [999]`` (or [399] for the
SDXL one-step recipe, with the optional regression warm-up: for the first
``regression_steps`` steps the generator is fitted to the teacher's DDIM ODE solution from
the same noise, L2 on latents or LPIPS on decoded images — DMD (Yin et al. 2023), Sec. 3.3);
``regression_weight`` keeps that term on for the whole run, weighted, as DMD itself does (eq. 8).

Sampling and export (our choice, measured): the generator predicts x0 directly, without
LCM's boundary condition. The stock ``LCMScheduler`` applies x0' = c_skip·x + c_out·x0̂ with
c_skip = 0.25/((10t)² + 0.25), c_out = 10t/sqrt((10t)² + 0.25): at t = 249, c_skip = 4.0e-8
and 1 − c_out = 2.0e-8 (t = 999: 2.5e-9, 1.3e-9), so the stock pipeline's images equal our
sampler's (:func:`~diffdistill.sampling.sample_lcm` on the plain denoiser) to ~1e-7 relative
(measured on the tiny SD model: 1.4e-7 at 4 steps, 1e-11 at one step) — well inside the 1e-4
the export tests check. Exports therefore ship an ``LCMScheduler``
whose ``original_inference_steps`` makes ``set_timesteps(K)`` produce exactly the training
timesteps (K steps over T = 1000: original_inference_steps = K gives 999, 749, …); grids no
such value reproduces (e.g. [399]) are passed as ``timesteps=`` in the model card's call.

``train.ema_decay`` (optional evaluation EMA of the generator) is applied every global step,
i.e. also on the steps where only the fake score moved.

Memory: the real score shares weights with nothing trainable. With LoRA the generator is the
teacher UNet + adapter "generator" and the real score is that UNet with adapters disabled;
the fake score is a structural copy sharing every base tensor with it plus its own adapter
"fake_score" (``dmd2.fake_score_shares_base``), so one base UNet serves all three.
See ``benchmarks/train_memory.py`` for measured numbers.

Teachers: SD-structured latent (SD1.5, SDXL) and pixel class-conditional ``UNet2DModel``, any
prediction type (epsilon, v_prediction, sample) on a discrete VP schedule.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from diffdistill.backbone import grid_shape
from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond, lcm_boundary
from diffdistill.losses import l2
from diffdistill.world import resolve_model_path

from .base import Trainer
from .common import BackboneMixin, frozen, shared_weights_copy
from .dm import DistributionMatching, ttur_generator_step

Tensor = torch.Tensor


@dataclass
class DMD2Section:
    guidance_scale: float = 1.75  # real-score CFG: 1.75 SD1.5 (low-guidance FID), 8 SDXL
    timesteps: list[int] = field(default_factory=lambda: [999])  # 1-step: [999] (SDXL: [399])
    backward_simulation: bool = True  # multi-step inputs from the student's own chain
    fake_updates_per_generator_update: int = 10  # TTUR: 10 SD1.5, 5 ImageNet / SDXL
    dm_t_min: float = 0.02  # DM t ~ U[0.02T, 0.98T] (DMD2)
    dm_t_max: float = 0.98
    # the fake score's denoising t: "dm" the DM range above, "all" U{0..T−1} (DMD2's code)
    fake_timesteps: Literal["dm", "all"] = "dm"
    fake_lr: Optional[float] = None  # fake score + GAN head (None: train.lr, as DMD2)
    gan_generator_weight: float = 1e-3  # 1e-3 SD1.5, 3e-3 ImageNet, 5e-3 SDXL; 0: no GAN
    gan_discriminator_weight: float = 1e-2  # DMD2: 1e-2; 0: no GAN head at all
    gan_head_channels: Optional[int] = None  # hidden width of the head (None: bottleneck's)
    gan_balance: Optional[float] = None  # b: ‖GAN grad‖ = b·‖DM grad‖ on x (replaces weight)
    regression_steps: int = 0  # generator warm-up on teacher ODE pairs (SDXL 1-step recipe)
    regression_loss: Literal["l2", "lpips"] = "l2"  # lpips: on decoded images
    regression_ode_steps: int = 25  # DDIM steps of the teacher's ODE solution
    regression_guidance_scale: Optional[float] = None  # None: guidance_scale
    # λ_reg: keep DMD's regression term on beside L_DM on every generator update (DMD, Yin
    # et al. 2023, eq. 8: L = L_KL + λ_reg L_reg, λ_reg 0.25): each noise is pulled towards
    # the teacher's own image for it, a mode-covering anchor against DM's mode seeking. One
    # step only; 0: off
    regression_weight: float = 0.0
    lpips_weights: str = ""  # torchvision alexnet state dict for lpips (or the env variable)
    # what the generator's UNet output means (None: the teacher's type); "sample" / "v_prediction"
    # keep x0̂ well conditioned at t ≈ T, where ε's x0 = (x − σε̂)/α magnifies errors by σ/α
    generator_prediction: Optional[Literal["epsilon", "v_prediction", "sample"]] = None
    x0_dtype: Literal["fp32", "fp64"] = "fp32"  # teacher x0 arithmetic (DMD2 code: float64)
    fake_score_shares_base: bool = True  # LoRA: fake score = shared base + its own adapter
    # at every periodic eval (eval.every), the discriminator's ROC AUC on a fixed probe of
    # this many real (the dataset's last items) and generated samples, noised at fixed t in
    # the discriminator's range: eval/d_auc in metrics.jsonl (0: off)
    d_probe_samples: int = 256


@dataclass
class DMD2Config(BaseConfig):
    dmd2: DMD2Section = field(default_factory=DMD2Section)

    def validate(self) -> None:
        super().validate()
        d = self.dmd2
        ts = d.timesteps
        if not ts:
            raise ConfigError("dmd2.timesteps is empty; one step is [999]")
        if any(t < 0 for t in ts) or any(b >= a for a, b in itertools.pairwise(ts)):
            raise ConfigError(f"dmd2.timesteps must be non-negative and strictly descending, "
                              f"got {ts}")
        if d.fake_updates_per_generator_update < 1:
            raise ConfigError("dmd2.fake_updates_per_generator_update must be >= 1")
        if not 0.0 <= d.dm_t_min < d.dm_t_max <= 1.0:
            raise ConfigError(f"dmd2.dm_t_min/dm_t_max must satisfy 0 <= min < max <= 1, got "
                              f"{d.dm_t_min}, {d.dm_t_max}")
        if d.guidance_scale <= 0:
            raise ConfigError("dmd2.guidance_scale must be > 0 (1 disables guidance)")
        if d.d_probe_samples < 0 or d.d_probe_samples == 1:
            raise ConfigError("dmd2.d_probe_samples must be 0 (off) or >= 2")
        if d.gan_generator_weight < 0 or d.gan_discriminator_weight < 0:
            raise ConfigError("dmd2.gan_generator_weight / gan_discriminator_weight must be >= 0")
        if d.gan_generator_weight > 0 and d.gan_discriminator_weight == 0:
            raise ConfigError("dmd2.gan_generator_weight > 0 needs a trained discriminator: set "
                              "dmd2.gan_discriminator_weight > 0 (DMD2: 1e-2)")
        if d.gan_discriminator_weight > 0 and self.data.kind == "prompts":
            raise ConfigError(
                "DMD2's GAN term needs real images, but data.kind='prompts' has none: use an "
                "image dataset (data.kind) or set dmd2.gan_generator_weight=0 and "
                "dmd2.gan_discriminator_weight=0")
        if len(ts) > 1 and not d.backward_simulation and self.data.kind == "prompts":
            raise ConfigError("dmd2.backward_simulation=false noises real images for the later "
                              "steps, but data.kind='prompts' has none: enable it or use images")
        if d.gan_balance is not None and not (d.gan_balance > 0 and d.gan_generator_weight > 0):
            raise ConfigError("dmd2.gan_balance must be > 0 and needs the GAN term on "
                              "(dmd2.gan_generator_weight > 0); null: the fixed weight")
        if d.generator_prediction and self.adapter.type == "lora":
            raise ConfigError("dmd2.generator_prediction needs adapter.type=full: a LoRA export "
                              "runs on its base model's scheduler, which predicts "
                              "differently")
        if d.regression_steps < 0:
            raise ConfigError("dmd2.regression_steps must be >= 0")
        if d.regression_weight < 0:
            raise ConfigError("dmd2.regression_weight must be >= 0 (0: off)")
        if d.regression_weight > 0 and len(ts) > 1:
            raise ConfigError("dmd2.regression_weight is for one-step generators (its target "
                              "is the teacher's ODE solution from the generator's own noise); "
                              f"dmd2.timesteps has {len(ts)} steps")
        if d.regression_ode_steps < 1:
            raise ConfigError("dmd2.regression_ode_steps must be >= 1")
        if d.fake_lr is not None and d.fake_lr <= 0:
            raise ConfigError("dmd2.fake_lr must be > 0 (or null for train.lr)")


# ----------------------------------------------------------------------------- helpers


def lcm_original_steps(timesteps: list[int], num_train_timesteps: int) -> Optional[int]:
    """The ``original_inference_steps`` for which ``LCMScheduler.set_timesteps(K)`` yields
    exactly ``timesteps`` (the smallest such value), or None if none does."""
    from diffdistill.sampling import lcm_timesteps

    k = len(timesteps)
    for ois in range(k, num_train_timesteps + 1):
        if lcm_timesteps(k, ois, num_train_timesteps).tolist() == list(timesteps):
            return ois
    return None


def pixel_usage_code(model_id: str, timesteps: list[int], ois: Optional[int],
                     shape: tuple[int, int, int], class_label: int = 0) -> str:
    """Sampling code for an exported class-conditional pixel generator (no stock pipeline
    passes class labels to a ``UNet2DModel``, so the stock scheduler is stepped by hand)."""
    set_ts = (f"scheduler.set_timesteps({len(timesteps)})" if ois is not None
              else f"scheduler.set_timesteps(timesteps={list(timesteps)})")
    return "\n".join([
        "import torch",
        "from diffusers import LCMScheduler, UNet2DModel",
        "",
        f"unet = UNet2DModel.from_pretrained({model_id!r}, subfolder=\"unet\").eval()",
        f"scheduler = LCMScheduler.from_pretrained({model_id!r}, subfolder=\"scheduler\")",
        set_ts,
        "generator = torch.Generator().manual_seed(0)",
        f"class_labels = torch.tensor([{int(class_label)}])",
        f"x = torch.randn((1, {shape[0]}, {shape[1]}, {shape[2]}), generator=generator)",
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        "        out = unet(x, t, class_labels=class_labels).sample",
        "        x = scheduler.step(out, t, x, generator=generator).prev_sample",
        "image = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # NCHW uint8",
        "",
    ])


# ----------------------------------------------------------------------------- trainer


class DMD2Trainer(BackboneMixin, Trainer):
    method = "dmd2"
    config_class = DMD2Config
    trains_flow_transformers = True  # SD3-class teachers: distribution matching alone

    # -- hooks for methods built on DMD2 ----------------------------------------------
    def dm_weight(self, x_t: Tensor, t: Tensor, logits: Optional[Tensor]) -> Optional[Tensor]:
        """Per-sample weight h of the score difference (None: h = 1, plain DMD2)."""
        return None

    def discriminator_penalty(self, x_real_t: Tensor, t: Tensor, cond: Cond) -> Optional[Tensor]:
        """An extra discriminator loss term on noised real samples (None: none)."""
        return None

    # -- build ----------------------------------------------------------------------
    @property
    def gan(self) -> bool:
        return self.cfg.dmd2.gan_discriminator_weight > 0

    @property
    def lora(self) -> bool:
        return self.cfg.adapter.type == "lora"

    def build(self) -> None:
        from diffdistill.adapters import clone_unet, make_trainable
        from diffdistill.gan import DiscriminatorHead, UNetWithHead, bottleneck_channels

        cfg, d = self.cfg, self.cfg.dmd2
        bb = self.load_backbone()
        sched = bb.schedule
        flow = sched.kind == "flow"
        if not flow and (sched.kind != "vp" or bb.prediction_type not in (
                "epsilon", "v_prediction", "sample")):
            raise ConfigError(f"model.path: DMD2 needs a discrete-time (VP) teacher predicting "
                              f"epsilon, v_prediction or sample, or a rectified flow; "
                              f"{cfg.model.path} is {sched.kind}/{bb.prediction_type}")
        if flow and d.generator_prediction:
            raise ConfigError("dmd2.generator_prediction: a flow student predicts the velocity "
                              "as its teacher does; remove the key")
        T = sched.num_train_timesteps
        if max(d.timesteps) >= T:
            raise ConfigError(f"dmd2.timesteps: {max(d.timesteps)} is not below the teacher's "
                              f"T={T}")
        self.T = T
        self.timesteps = [int(t) for t in d.timesteps]
        self.t_lo, self.t_hi = int(d.dm_t_min * T), min(int(d.dm_t_max * T), T - 1)
        self.shape = grid_shape(bb, cfg.data.resolution)
        self.x0_dtype = torch.float64 if d.x0_dtype == "fp64" else torch.float32
        frozen_dtype = self.frozen_dtype

        teacher = bb.unet.requires_grad_(False).eval()
        kw = self.adapter_kwargs()
        if self.lora:
            # The fake score's structure is copied before the generator's adapter exists.
            fake_unet = (shared_weights_copy(teacher) if d.fake_score_shares_base
                         else clone_unet(teacher))
            gen_unet = teacher  # real score = this UNet with adapters disabled
            self.real_unet = None
            make_trainable(gen_unet, adapter_name="generator", frozen_dtype=frozen_dtype, **kw)
            make_trainable(fake_unet, adapter_name="fake_score", frozen_dtype=frozen_dtype, **kw)
        else:
            fake_unet = clone_unet(teacher)
            gen_unet = clone_unet(teacher)
            self.real_unet = teacher.to(frozen_dtype)
            make_trainable(gen_unet, **kw)
            make_trainable(fake_unet, **kw)
        head = (DiscriminatorHead(bottleneck_channels(fake_unet), d.gan_head_channels)
                .to(self.device) if self.gan else None)
        self.student = self.add_optimizer("generator", gen_unet)
        self.fake_score = self.add_optimizer("fake_score", UNetWithHead(fake_unet, head),
                                             lr=d.fake_lr)
        self.add_eval_ema("generator", self.student)
        self.dm = DistributionMatching(
            self, real=self.real_denoiser, fake_score=self.fake_score,
            t_range=(self.t_lo, self.t_hi), guidance_scale=d.guidance_scale,
            compute_dtype=self.x0_dtype, gan_generator_weight=d.gan_generator_weight,
            gan_discriminator_weight=d.gan_discriminator_weight, gan_balance=d.gan_balance,
            weight_fn=self.dm_weight, penalty_fn=self.discriminator_penalty,
            fake_t_range=(0, T - 1) if d.fake_timesteps == "all" else None)
        self._lpips = None

    def needs_discriminator(self) -> bool:
        """Whether the method runs a discriminator head (DMD2: its GAN term)."""
        return self.gan

    # -- networks as denoisers --------------------------------------------------------
    def denoiser(self, net: nn.Module):
        return self.backbone.denoiser(net, compute_dtype=self.x0_dtype)

    def generator_denoiser(self, net: nn.Module):
        """The generator as a denoiser, in its own output parameterisation."""
        return self.backbone.denoiser(net, compute_dtype=self.x0_dtype,
                                      prediction_type=self.cfg.dmd2.generator_prediction)

    @contextlib.contextmanager
    def real_score(self):
        """The frozen teacher: a separate UNet (full) or the generator's base (LoRA)."""
        from diffdistill.adapters import adapters_disabled

        if self.real_unet is not None:
            yield self.real_unet
        else:
            with adapters_disabled(self.unwrap(self.student)) as unet:
                yield unet

    @contextlib.contextmanager
    def real_denoiser(self):
        """The real score as a denoiser (the DM component's ``real``)."""
        with self.real_score() as unet:
            yield self.denoiser(unet)

    def generator_unet(self) -> nn.Module:
        """The network to sample from / export: the EMA copy when EMA is on."""
        return self.ema_or_online("generator", self.student)

    # -- randomness -------------------------------------------------------------------
    def sample_t(self, n: int) -> Tensor:
        return self.dm.sample_t(n)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.backbone.schedule.add_noise(x0, noise, t.cpu())

    # -- generator inputs -------------------------------------------------------------
    def is_generator_step(self) -> bool:
        if self.global_step < self.cfg.dmd2.regression_steps:
            return True
        return ttur_generator_step(self.global_step,
                                   self.cfg.dmd2.fake_updates_per_generator_update)

    @torch.no_grad()
    def simulate_inputs(self, noise: Tensor, steps: Tensor, cond: Cond) -> Tensor:
        """Backward simulation: x_{t_k} for each sample's step k from the student's own chain
        (x0̂ = G(x, t_j), re-noised to t_{j+1} with fresh noise), started from pure noise."""
        gen = self.generator_denoiser(self.side_pass(self.student))
        x, out = noise, noise.clone()
        for j in range(int(steps.max())):
            x0 = gen(x, float(self.timesteps[j]), cond).x0.to(noise.dtype)
            t_next = torch.full((x.shape[0],), float(self.timesteps[j + 1]), dtype=torch.float64)
            x = self.add_noise(x0, self.randn(*x.shape), t_next)
            hit = (steps == j + 1).to(x.device)
            out[hit] = x[hit]
        return out

    def generator_inputs(self, noise: Tensor, cond: Cond,
                         x_real: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(x_in, t_in) for one batch: pure noise at t_0, or x_{t_k} at a random step k."""
        n = noise.shape[0]
        if len(self.timesteps) == 1:
            return noise, torch.full((n,), float(self.timesteps[0]), dtype=torch.float64)
        steps = self.randint(0, len(self.timesteps), (n,)).cpu()
        t_in = torch.tensor(self.timesteps, dtype=torch.float64)[steps]
        if self.cfg.dmd2.backward_simulation:
            return self.simulate_inputs(noise, steps, cond), t_in
        noised = self.add_noise(x_real, self.randn(*noise.shape), t_in)
        first = (steps == 0).to(noise.device).reshape(-1, 1, 1, 1)
        return torch.where(first, noise, noised), t_in

    def generate(self, x_in: Tensor, t_in: Tensor, cond: Cond, net=None) -> Tensor:
        """x0̂ = G(x_in, t_in) in float32 (grad follows the caller's mode)."""
        net = net if net is not None else self.student
        return self.generator_denoiser(net)(x_in, t_in, cond).x0.float()

    # -- losses -----------------------------------------------------------------------
    def distribution_matching_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, dict]:
        """L_DM (+ the generator's GAN term) on generator samples ``x``
        (:meth:`~diffdistill.trainers.dm.DistributionMatching.generator_loss`)."""
        return self.dm.generator_loss(x, cond)

    def regression_loss(self, noise: Tensor, x: Tensor, cond: Cond) -> Tensor:
        """Distance between G(noise) and the teacher's DDIM ODE solution from ``noise``."""
        from diffdistill.sampling import ddim_timesteps, sample_ddim

        d = self.cfg.dmd2
        gs = d.regression_guidance_scale if d.regression_guidance_scale is not None else (
            d.guidance_scale)
        ts = ddim_timesteps(d.regression_ode_steps, spacing="trailing", num_train_timesteps=self.T)
        with torch.no_grad(), self.real_score() as real:
            target = sample_ddim(self.denoiser(real), noise, ts, cond, guidance_scale=gs).float()
        if d.regression_loss == "l2":
            return l2(x, target).mean()
        bb = self.backbone
        lp = self._lpips_net()
        return lp(bb.decode_latents(x).clamp(-1, 1), bb.decode_latents(target).clamp(-1, 1)
                  ).mean()

    def _lpips_net(self):
        if self._lpips is None:
            from diffdistill.eval.lpips_metric import LPIPSMetric

            self._lpips = LPIPSMetric(weights_path=self.cfg.dmd2.lpips_weights or None,
                                      device=self.device).model
        return self._lpips

    def fake_score_loss(self, x: Tensor, cond: Cond, x_real: Optional[Tensor]
                        ) -> tuple[Tensor, dict]:
        """Denoising loss on detached generator samples (+ the discriminator's GAN loss)."""
        return self.dm.fake_score_loss(x, cond, x_real)

    # -- the step ---------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        d = self.cfg.dmd2
        cond = self.cond_for_batch(batch, with_uncond=d.guidance_scale != 1.0)
        needs_real = self.gan or (len(self.timesteps) > 1 and not d.backward_simulation)
        x_real = self.encode_x0(batch) if needs_real else None
        n = len(batch["caption"]) if "caption" in batch else len(batch["class_label"])
        noise = self.randn(n, *self.shape)
        logs: dict = {}
        if self.global_step < d.regression_steps:
            t0 = torch.full((n,), float(self.timesteps[0]), dtype=torch.float64)
            x = self.generate(noise, t0, cond)
            loss = self.regression_loss(noise, x, cond)
            self.step("generator", loss)
            logs["loss_regression"] = loss.detach()
        elif self.is_generator_step():
            with frozen(self.unwrap(self.fake_score)):
                x_in, t_in = self.generator_inputs(noise, cond, x_real)
                x = self.generate(x_in, t_in, cond)
                loss, glogs = self.distribution_matching_loss(x, cond)
                if d.regression_weight > 0:  # one step: x_in is the noise itself
                    reg = self.regression_loss(x_in, x, cond)
                    loss = loss + d.regression_weight * reg
                    glogs["loss_regression"] = reg.detach()
                self.step("generator", loss)
            logs.update(glogs)
        else:
            with torch.no_grad():
                x_in, t_in = self.generator_inputs(noise, cond, x_real)
                x = self.generate(x_in, t_in, cond)
        loss_f, flogs = self.fake_score_loss(x.detach(), cond, x_real)
        self.step("fake_score", loss_f)
        logs.update(flogs)
        logs["loss_fake"] = loss_f.detach()
        return logs

    # -- the discriminator's held-out measure -------------------------------------------
    PROBE_SEED = 0x0D15C  # fixed: the probe is the same set at every evaluation of a run

    def _discriminator_probe_batch(self) -> Optional[dict]:
        """The fixed probe: real samples (the dataset's last items, their conditioning), the
        seeds of the generated ones, and per-pair timesteps and noises — from a generator of
        its own, so a run with the probe stays bit-identical to one without."""
        n = self.cfg.dmd2.d_probe_samples
        ds = self.dataset
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            return None  # streamed shards: no fixed items to take
        from diffdistill.data import collate

        from .batches import _to_device

        n = min(n, len(ds))
        batch = _to_device(collate([ds[i] for i in range(len(ds) - n, len(ds))]), self.device)
        g = torch.Generator().manual_seed(self.PROBE_SEED)
        x = batch["pixel_values"].to(self.device, torch.float32)
        with torch.no_grad():
            x_real = self.backbone.encode_images(x, generator=g).float()
        lo, hi = self.dm.fake_t_range or (self.dm.t_lo, self.dm.t_hi)
        from diffdistill.schedule import sample_uniform_t

        return {"x_real": x_real, "cond": self.cond_for_batch(batch),
                "t": sample_uniform_t(n, lo, hi, generator=g),
                "noise_real": torch.randn(x_real.shape, generator=g).to(self.device),
                "noise_fake": torch.randn(x_real.shape, generator=g).to(self.device),
                "seeds": [10**6 + i for i in range(n)]}

    def eval_diagnostics(self) -> dict[str, float]:
        """``eval/d_auc`` (+ low / high-t halves, mean logits) of the GAN head on the fixed
        probe, generated by the online (not EMA) generator the head is trained against."""
        head = getattr(self.unwrap(self.fake_score), "head", None)
        if head is None or self.cfg.dmd2.d_probe_samples == 0:
            return {}
        if "_d_probe" not in self.__dict__:
            self._d_probe = self._discriminator_probe_batch()
        p = self._d_probe
        if p is None:
            return {}
        from diffdistill.sampling import generate

        cond = p["cond"]
        x_fake = generate(self.generator_denoiser(self.student), seeds=p["seeds"],
                          shape=self.shape, cond_fn=cond.index, sampler="lcm",
                          timesteps=torch.tensor(self.timesteps), output="latents",
                          batch_size=64, progress=False).to(self.device)
        values = self.dm.discriminator_probe(p["x_real"], x_fake, cond, p["t"],
                                             p["noise_real"], p["noise_fake"])
        return {f"eval/{k}": v for k, v in values.items()}

    # -- sampling and export ----------------------------------------------------------
    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        trained = list(self.timesteps)
        return EvalModel(self.method, self.backbone, self.generator_denoiser(unet if unet is not None else self.generator_unet()),
                         "lcm",
                         timesteps=lambda n: trained if n == len(trained) else None)

    def grid_step_counts(self) -> list[int]:
        return [len(self.timesteps)]  # its trained grid

    @torch.no_grad()
    def sample_latents(self, seeds: list[int], cond: Optional[Cond]) -> torch.Tensor:
        """The trainer's own sampler on the generator (latents / pixels, float32): what an
        export must reproduce."""
        from diffdistill.sampling import generate

        model = self.generator_denoiser(self.generator_unet())
        return generate(model, seeds=seeds, shape=self.shape, cond_fn=lambda sl: (
            cond.index(sl) if cond is not None else None), sampler="lcm",
            timesteps=torch.tensor(self.timesteps), output="latents", progress=False)

    def _export_flow(self, unet: nn.Module, out: Path, base_model: str) -> Path:
        """A flow student: FlowMatchEulerDiscreteScheduler with shift 1 and stochastic
        sampling (x0̂ = x − σ v̂, re-noised along the flow path: the trainer's sampler), called
        with the trained sigmas t / T."""
        from diffdistill.export import (
            flow_usage_code,
            save_generator,
            write_export_info,
            write_model_card,
        )

        bb = self.backbone
        sigmas = [t / self.T for t in self.timesteps]
        save_generator(bb, unet, out, lora=self.lora, scheduler="flow_stochastic",
                       adapter_name="generator")
        write_export_info(out, **self.eval_spec(unet).export_info(len(sigmas)),
                          method=self.method)
        code = flow_usage_code(bb, model_id=str(out), base_model=base_model, lora=self.lora,
                               sigmas=sigmas, prompt=self.card_prompt())
        write_model_card(out, prompt=self.card_prompt(), method=self.method,
                         base_model=base_model, steps=len(sigmas), guidance_scale=1.0,
                         scheduler="flow_stochastic", lora=self.lora, kind=bb.kind,
                         extra={"training timesteps": self.timesteps, "sigmas": sigmas,
                                "real-score guidance": self.cfg.dmd2.guidance_scale},
                         code=code)
        return out

    def export(self, out_dir: Path) -> Optional[Path]:
        from diffdistill.export import save_generator, write_export_info, write_model_card

        bb, out = self.backbone, Path(out_dir)
        base_model = resolve_model_path(self.cfg.model.path)  # world:NAME -> its folder
        unet = self.generator_unet()
        if bb.schedule.kind == "flow":
            return self._export_flow(unet, out, base_model)
        ois = lcm_original_steps(self.timesteps, self.T)
        sched_kwargs = {"original_inference_steps": ois} if ois is not None else {}
        if self.cfg.dmd2.generator_prediction:  # the stock LCMScheduler reads the output so
            sched_kwargs["prediction_type"] = self.cfg.dmd2.generator_prediction
        call_kwargs = {} if ois is not None else {"timesteps": list(self.timesteps)}
        steps = len(self.timesteps)
        c_skip, c_out = lcm_boundary(torch.tensor(self.timesteps, dtype=torch.float64))
        extra = {"training timesteps": self.timesteps,
                 "real-score guidance": self.cfg.dmd2.guidance_scale,
                 "note": f"trained without LCM's boundary condition; the stock LCMScheduler "
                         f"applies it (c_skip <= {float(c_skip.max()):.1e}, |1 - c_out| <= "
                         f"{float((1 - c_out).abs().max()):.1e} at these timesteps)"}
        lora = self.lora and bb.kind != "pixel"
        save_generator(bb, unet, out, lora=lora, scheduler="lcm", scheduler_kwargs=sched_kwargs,
                       adapter_name="generator")
        write_export_info(out, **self.eval_spec(unet).export_info(steps), method=self.method)
        if lora:
            write_model_card(out, prompt=self.card_prompt(),
                             method=self.method, base_model=base_model,
                             steps=steps, guidance_scale=1.0, scheduler="lcm", lora=True,
                             kind=bb.kind, scheduler_kwargs=sched_kwargs,
                             call_kwargs=call_kwargs, extra=extra)
            return out
        code = None
        if bb.kind == "pixel":
            extra["sampling"] = ("class-conditional UNet2DModel + LCMScheduler; no stock "
                                 "pipeline passes class labels, so step the scheduler by hand "
                                 "as above")
            code = pixel_usage_code(str(out), self.timesteps, ois, self.shape)
        write_model_card(out, prompt=self.card_prompt(),
                         method=self.method, base_model=base_model, steps=steps,
                         guidance_scale=1.0, scheduler="lcm", lora=False, kind=bb.kind,
                         call_kwargs=call_kwargs, extra=extra, code=code)
        return out
