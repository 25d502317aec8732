"""rCM — score-regularized continuous-time consistency (Zheng et al. 2025, "Large Scale
Diffusion Distillation via Score-Regularized Continuous-Time Consistency", arXiv:2510.08431,
Sec. 4: the sCM loss plus the reverse-divergence DMD loss as a regulariser).

The student is sCD's (:mod:`diffdistill.trainers.scm`: the loss of Lu & Song 2024, Eq. 8–10,
against the guided teacher). On its updates a distribution-matching term is added:

    L_student = L_sCD + λ·L_DM(x0̂),   λ = ``rcm.dm_weight``

where x0̂ = f_θ is the student's own one- or two-step sample from pure noise (its trained
samplers: x0̂ at t_max, or re-noised at t(t̂_mid) first with the earlier step under no_grad;
``rcm.generator_steps`` cycles over student updates, as the reference code cycles its
simulation steps) and L_DM is DMD's (Yin et al. 2023, Eq. 7; DMD2's normalisation) through
the toolkit's one :class:`~diffdistill.trainers.dm.DistributionMatching`: real score = the
frozen teacher with CFG (``rcm.guidance_scale``, default sCD's), fake score = a trainable
copy of the teacher fitted by the denoising loss to the student's samples with its own
optimizer (``rcm.fake_lr``, required) — on every step, the student on every
``rcm.fake_updates_per_student_update``-th (the two time-scale rule; rCM's reference trains
Wan 1.3B with 5). No GAN: rCM needs no real images for the DM term (sCD still noises data
samples; prompts-only data is refused there).

The student's sample and the sCD batch go through one student forward (F rows of the batch,
then of the sample; :meth:`SCMTrainer.tangent_terms`): x̂' = x_t / (α_t / cos t̂') at
t̂' = t̂(t), and x0̂ = cos t̂'·x̂' − sin t̂'·σ_d F (TrigFlow's f, equal to the network's x0̂ at t).
The DM term starts at ``rcm.dm_start_step`` (default: the end of the tangent warm-up, as the
reference code does); before that every step is an sCD student step (the fake score already
trains). Weight: the reference scales the per-sample *sums* 100·‖F − F⁻ − g‖² and
‖x − sg(x − grad)‖² (no ½); our terms are per-element means, the DM one with ½, so the same
balance at w(t̂) = 0 is λ = 2/100 = 0.02 (the default).

With dropout in the network, the batched forward's mask for the sCD rows is not the θ⁻
JVP's (sCM's shared mask); the toolkit's teachers have no dropout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from diffdistill.config import ConfigError
from diffdistill.trigflow import consistency, input_scale, trig_time_of

from .common import frozen, shared_weights_copy
from .dm import DistributionMatching, ttur_generator_step
from .scm import SCMConfig, SCMTrainer, _b

Tensor = torch.Tensor


@dataclass
class RCMSection:
    dm_weight: float = 0.02  # λ on L_DM (the reference's 1/100 on sums, in our means)
    fake_lr: Optional[float] = None  # the fake score's learning rate (required; Wan 1.3B: 4e-7)
    fake_updates_per_student_update: int = 5  # TTUR (the reference's student_update_freq)
    guidance_scale: Optional[float] = None  # real-score CFG (None: scm.guidance_scale)
    generator_steps: list[int] = field(default_factory=lambda: [1, 2])  # cycled
    dm_start_step: Optional[int] = None  # None: scm.tangent_warmup_steps
    dm_t_min: float = 0.02  # DM noising t ~ U[0.02T, 0.98T] (DMD2)
    dm_t_max: float = 0.98


@dataclass
class RCMConfig(SCMConfig):
    rcm: RCMSection = field(default_factory=RCMSection)

    def validate(self) -> None:
        super().validate()
        r = self.rcm
        if self.scm.mode != "cd":
            raise ConfigError("method rcm is sCD plus distribution matching: set scm.mode=cd "
                              "(and a teacher in model.path)")
        if r.fake_lr is None or r.fake_lr <= 0:
            raise ConfigError("rcm.fake_lr: the fake score needs its own learning rate (> 0; "
                              "rCM's Wan 1.3B recipe: 4e-7 beside the student's 2e-6)")
        if r.dm_weight < 0:
            raise ConfigError(f"rcm.dm_weight must be >= 0 (0: plain sCD), got {r.dm_weight}")
        if r.fake_updates_per_student_update < 1:
            raise ConfigError("rcm.fake_updates_per_student_update must be >= 1")
        if not r.generator_steps or any(k not in (1, 2) for k in r.generator_steps):
            raise ConfigError(f"rcm.generator_steps must list 1 and/or 2 (the student's "
                              f"samplers), got {r.generator_steps}")
        if r.guidance_scale is not None and r.guidance_scale < 1:
            raise ConfigError(f"rcm.guidance_scale must be >= 1, got {r.guidance_scale}")
        if r.dm_start_step is not None and r.dm_start_step < 0:
            raise ConfigError("rcm.dm_start_step must be >= 0 (null: scm.tangent_warmup_steps)")
        if not 0.0 <= r.dm_t_min < r.dm_t_max <= 1.0:
            raise ConfigError(f"rcm.dm_t_min/dm_t_max must satisfy 0 <= min < max <= 1, got "
                              f"{r.dm_t_min}, {r.dm_t_max}")


class RCMTrainer(SCMTrainer):
    method = "rcm"
    config_class = RCMConfig

    # -- build ------------------------------------------------------------------------
    def before_student(self, bb) -> None:
        from diffdistill.adapters import clone_unet

        lora = self.cfg.adapter.type == "lora"
        # LoRA: the fake score is the same base tensors plus its own adapter (as DMD2's)
        self._fake_unet = shared_weights_copy(bb.unet) if lora else clone_unet(bb.unet)

    def build(self) -> None:
        from diffdistill.adapters import make_trainable

        super().build()
        cfg, r = self.cfg, self.cfg.rcm
        if self.backbone.schedule.kind != "vp":
            raise ConfigError("method rcm: only discrete-time (VP) teachers are supported yet")
        lora = cfg.adapter.type == "lora"
        kw = self.adapter_kwargs(frozen_dtype=self.frozen_dtype) if lora else (
            self.adapter_kwargs())
        make_trainable(self._fake_unet, adapter_name="fake_score" if lora else "default", **kw)
        self.fake_score = self.add_optimizer("fake_score", self._fake_unet, lr=r.fake_lr)
        del self._fake_unet
        T = self.backbone.schedule.num_train_timesteps
        self.dm = DistributionMatching(
            self, real=self.real_denoiser, fake_score=self.fake_score,
            t_range=(int(r.dm_t_min * T), min(int(r.dm_t_max * T), T - 1)),
            guidance_scale=self.real_guidance)

    @property
    def real_guidance(self) -> float:
        r = self.cfg.rcm
        return r.guidance_scale if r.guidance_scale is not None else self.cfg.scm.guidance_scale

    @property
    def dm_start(self) -> int:
        r = self.cfg.rcm
        return r.dm_start_step if r.dm_start_step is not None else (
            self.cfg.scm.tangent_warmup_steps)

    @contextlib.contextmanager
    def real_denoiser(self):
        """The real score: the frozen teacher (a LoRA student's UNet with its LoRA off)."""
        with torch.no_grad(), self.teacher_context():
            yield self.teacher_tf.denoiser

    # -- the student's sample ------------------------------------------------------------
    def is_student_step(self, step: Optional[int] = None) -> bool:
        step = self.global_step if step is None else step
        return step < self.dm_start or ttur_generator_step(
            step, self.cfg.rcm.fake_updates_per_student_update, self.dm_start)

    def generator_step_count(self, step: Optional[int] = None) -> int:
        """The sampler whose x0̂ the DM term (or the fake score) sees on this step."""
        step = self.global_step if step is None else step
        ks = self.cfg.rcm.generator_steps
        return ks[(step // self.cfg.rcm.fake_updates_per_student_update) % len(ks)]

    def generator_input(self, n: int, cond, steps: int) -> tuple[Tensor, Tensor]:
        """(x_t, t) of the student's last sampling step from fresh noise: pure noise at t_max,
        or (two steps) its first x0̂ under no_grad re-noised to t(t̂_mid)."""
        from diffdistill.backbone import grid_shape

        grid = self.sample_timesteps(steps).tolist()
        x = self.randn(n, *grid_shape(self.backbone, self.cfg.data.resolution))
        den = self.backbone.denoiser(self.side_pass(self.unet))
        for t, t_next in zip(grid[:-1], grid[1:]):
            with torch.no_grad():
                x0 = den(x, t, cond).x0.float()
            tn = torch.full((n,), t_next, dtype=torch.float64)
            x = self.backbone.schedule.add_noise(x0, self.randn(*x.shape), tn)
        return x, torch.full((n,), grid[-1], dtype=torch.float64)

    def to_trigflow(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂, t̂) of a native (x_t, t): t̂ = atan2(σ_t, α_t σ_d), x̂ = x_t·cos t̂/α_t."""
        sched, sd = self.backbone.schedule, self.cfg.scm.sigma_data
        t_hat = trig_time_of(sched, t, sd).clamp(*self.t_range).to(self.device)
        return x / _b(input_scale(sched, t, sd), x), t_hat

    @torch.no_grad()
    def generator_sample(self, n: int, cond, steps: int) -> Tensor:
        """The student's ``steps``-step x0̂ without gradient (the fake score's data)."""
        x, t = self.generator_input(n, cond, steps)
        return self.backbone.denoiser(self.side_pass(self.unet))(x, t, cond).x0.float()

    # -- the step ---------------------------------------------------------------------
    def student_terms(self, batch: dict) -> dict:
        """sCD's terms with, once the DM term is on, λ·L_DM added to the network's term;
        ``x`` is the student's sample (with grad) or None."""
        cond = self.cond_for_batch(batch, with_uncond=self.real_guidance != 1.0)
        if self.global_step < self.dm_start or self.cfg.rcm.dm_weight == 0:
            terms = self.loss_terms(batch)
            terms.update(loss_scd=terms["loss_net"].detach(), x=None, cond=cond)
            return terms
        steps = self.generator_step_count()
        held: dict = {}

        def extra(student_cond):
            x_t, t = self.generator_input(batch_size(batch), student_cond, steps)
            held["x_hat"], held["t_hat"] = self.to_trigflow(x_t, t)
            return held["x_hat"], held["t_hat"]

        terms = self.loss_terms(batch, extra=extra)
        sd = self.cfg.scm.sigma_data
        x = consistency(held["x_hat"], sd * terms["f_extra"].float(), held["t_hat"]).float()
        with frozen(self.unwrap(self.fake_score)):
            loss_dm, logs = self.dm.generator_loss(x, cond)
        terms.update(logs)
        terms["loss_scd"] = terms["loss_net"].detach()
        terms["loss_net"] = terms["loss_net"] + self.cfg.rcm.dm_weight * loss_dm
        terms.update(x=x, cond=cond, generator_steps=float(steps))
        return terms

    def train_step(self, batch: dict) -> dict[str, float]:
        logs: dict = {}
        if self.is_student_step():
            terms = self.student_terms(batch)
            self.step("unet", terms["loss_net"])
            self.step("logvar", terms["loss_head"])
            x, cond = terms["x"], terms["cond"]
            logs.update({k: terms[k] for k in ("loss_dm", "grad_norm_dm", "generator_steps")
                         if k in terms})
            logs.update(loss=terms["loss"].detach(), loss_scd=terms["loss_scd"],
                        logvar=terms["logvar"], g_rms=terms["g_rms"],
                        tangent_warmup=self.tangent_warmup())
        else:
            x, cond = None, self.cond_for_batch(batch, with_uncond=self.real_guidance != 1.0)
        if x is None:
            n = batch_size(batch)
            x = self.generator_sample(n, cond.replace(uncond=None),
                                      self.generator_step_count())
        loss_f, flogs = self.dm.fake_score_loss(x.detach(), cond)
        self.step("fake_score", loss_f)
        logs.update(flogs)
        return logs


def batch_size(batch: dict) -> int:
    return len(batch["caption"] if "caption" in batch else batch["class_label"])


__all__ = ["RCMConfig", "RCMSection", "RCMTrainer"]
