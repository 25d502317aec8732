"""Hyper-SD: trajectory-segmented consistency distillation, reward feedback, one-step score
distillation, one unified LoRA (Ren et al. 2024, "Hyper-SD: Trajectory Segmented Consistency
Model for Efficient Image Synthesis", arXiv:2404.13686).

No official training code exists; Phased Consistency Models (Wang et al. 2024) is the nearest
open reference. Notation: VP native time t ∈ {0 … T−1}, x_t = α_t x0 + σ_t ε; the teacher
solver grid of LCD, τ_j = jΔ − 1 (j = 1 … N, Δ = T/N: N = 50 → Δ = 20).

**Segments.** With k segments the lower edges are s_0 = 0 < s_1 < … < s_{k−1}, where
{s_1 … s_{k−1}} are the entries after the first of the stock k-step ``TCDScheduler`` grid
(:func:`segment_edges`): k = 8 → 0, 139, 259, 379, 499, 639, 759, 879; k = 4 → 0, 259, 499, 759;
k = 2 → 0, 499; k = 1 → 0. They are the multiples of T/k snapped to the solver grid, and
exactly where a k-step TCD chain lands, so at γ = 0 that chain jumps edge to edge. A time t
belongs to segment i when s_i < t ≤ s_{i+1} (s_k = T): a grid time *on* an edge belongs to the
segment below it, which is what the sampler does there (it jumps down from it).

**Consistency function** — the student parameterises a jump to the edge (PCM / TCD style), not
an x0 predictor with boundary scalings:

    f_θ(x_t, t; s) = α_s x0̂_θ(x_t, t) + σ_s ε̂_θ(x_t, t)      (DDIM jump t → s, Song et al. Eq. 12)

with x0̂, ε̂ from :class:`~diffdistill.denoiser.Denoiser` (any prediction type). Because
α_t x0̂ + σ_t ε̂ = x_t holds algebraically for ε, v and x0 parameterisations, f(x, s; s) = x; the
code returns x itself there (:func:`segment_jump`), so the boundary condition is exact.

**TSCD loss** (Hyper-SD Sec. 3.1): t_{n+k} = τ_{n+1} uniform on the grid, s = edge of its
segment, t_n = max(t_{n+k} − Δ, 0) (edges are grid points, so s ≤ t_n), w ~ U[w_min, w_max],

    x_{t_{n+k}} = α x0 + σ ε
    x̂_{t_n}    = α_{t_n} x0̂^w + σ_{t_n} ε̂^w                 teacher DDIM step, CFG scale 1 + w
    L_TSCD     = d(f_θ(x_{t_{n+k}}, t_{n+k}; s), f_θ⁻(x̂_{t_n}, t_n; s))

d = MSE (the paper's) or element-wise pseudo-Huber; θ⁻ = EMA(θ) (decay ``target_ema_decay``).
When t_n = s the target is x̂_{t_n} itself (boundary condition). The solver step is
:func:`diffdistill.sampling.ddim_solver_step` (shared with LCD and ``sample_ddim``).
Optional adversarial term (PCM Sec. 4.3): a head on the frozen teacher UNet's bottleneck at
timestep s (:mod:`diffdistill.gan`) discriminates the target's jumps (real) from the student's
(fake); generator term softplus(−D(f_θ)), weight ``adversarial_weight``.

**Progressive stages** (``hypersd.stages``): k = 8 → 4 → 2 → 1 in one run, each with its own
length. The stage of a step is a pure function of ``global_step`` (resume lands in the right
stage); the LoRA (or full UNet) trains continuously, so each stage starts from the previous;
θ⁻ is reset to θ at every stage start.

**Human feedback** (Sec. 3.2, ReFL of Xu et al. 2023) in the stages that set ``reward: true``:
the stage's own k-step chain c_0 = T−1 > c_1 = s_{k−1} > … > c_{k−1} = s_1 runs from pure
noise without gradient (TCD at γ = 0: edge-to-edge jumps), x_{c_{m+1}} = sg f_θ(x_{c_m}, c_m;
c_{m+1}), to a step c_j drawn
uniformly among those in ``reward.t_range``; then x0̂ = x0̂_θ(x_{c_j}, c_j) with gradient is
decoded and scored, L_R = −λ R(decode(x0̂), prompt) with any
:class:`~diffdistill.rewards.RewardModel` (CLIP, HPSv2, PickScore, LAION aesthetic predictor,
ImageReward; local weights).

**Score distillation for one step** (Sec. 3.3, DMD of Yin et al. 2024) in a k = 1 stage with
``score_distill: true``: x = x0̂_θ(ε, T−1) is the one-step sample; L_DM is DMD2's
distribution-matching loss (:func:`diffdistill.losses.dmd_loss`) between the real score (the
teacher with CFG ``score_distill.guidance_scale``) and a fake score φ — a second LoRA on the
shared base (LoRA students; :func:`~diffdistill.trainers.common.shared_weights_copy`) or a full
copy — trained every step on sg(x) with the plain denoising loss ‖ε̂_φ(x_t, t) − ε‖² (ε-space
through the Denoiser, so any teacher parameterisation works). The DM term enters the student's
loss every ``fake_updates_per_generator_update``-th step of the stage (DMD2's two time-scale
rule); the TSCD loss stays on every step so the LoRA keeps serving multi-step sampling.

Per step: L = L_TSCD + λ_adv L_adv − λ_R R + λ_DM L_DM (the terms active in the stage). The
student's grad-carrying evaluations of a step (TSCD, ReFL's x0̂, the one-step sample) run as one
batched forward, so DDP sees each parameter used once per backward.

**Unified LoRA and export.** One adapter serves 1, 2, 4 and 8 steps with diffusers'
``TCDScheduler`` (Zheng et al. 2024; ``gamma`` = diffusers' ``eta``, passed explicitly because
the stock SD pipelines default eta to 0). Exports: LoRA → ``pytorch_lora_weights.safetensors``
(diffusers) + ``lora_kohya.safetensors``; full → a stock pipeline folder with ``TCDScheduler``;
both with a model card and ``diffdistill_export.json`` (sampler "tcd", gamma, served steps).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import nn

from diffdistill.backbone import grid_shape
from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond, Prediction
from diffdistill.losses import (
    elementwise_huber,
    gan_discriminator_loss,
    gan_generator_loss,
    l2,
)
from diffdistill.world import resolve_model_path

from .base import Trainer
from .common import BackboneMixin, frozen, shared_weights_copy
from .dm import DistributionMatching, ttur_generator_step
from .ema import ema_backed_copy
from .lcd import RewardSection
from .segments import reward_chain, segment_edges, segment_index, segment_jump

Tensor = torch.Tensor
log = logging.getLogger("diffdistill.train")


# ----------------------------------------------------------------------------- configs


@dataclass
class StageSpec:
    segments: int = 1  # k trajectory segments (Hyper-SD: 8 → 4 → 2 → 1)
    steps: Optional[int] = None  # optimizer steps of the stage; null: the last runs to the end
    score_distill: bool = False  # add DMD distribution matching (one-step; k = 1 stages only)
    reward: bool = False  # add the ReFL reward term (hypersd.reward)


def _default_stages() -> list[StageSpec]:
    return [StageSpec(8, 1000), StageSpec(4, 1000), StageSpec(2, 1000), StageSpec(1, None)]


@dataclass
class HyperSDRewardSection:
    weight: float = 1e-3  # λ_R (ReFL's reference grad scale 1e-3; Hyper-SD publishes none)
    t_range: list[int] = field(default_factory=lambda: [0, 999])  # stop steps c_j allowed
    model: RewardSection = field(default_factory=RewardSection)  # expert RM, local weights


@dataclass
class ScoreDistillSection:
    guidance_scale: float = 1.75  # real-score CFG (DMD2 SD1.5 low-guidance; 8 for SDXL)
    weight: float = 1.0  # λ_DM relative to the TSCD loss
    fake_updates_per_generator_update: int = 5  # DMD2 TTUR: 5 (SDXL) / 10 (SD1.5)
    t_min: float = 0.02  # DM and fake-score t ~ U[0.02T, 0.98T] (DMD2's DM range; its
    t_max: float = 0.98  # code trains the fake score on [0, T): dmd2.fake_timesteps=all)
    fake_lr: Optional[float] = None  # None: train.lr (DMD2)
    # the one-step generator's conditioning timestep (None: T−1), also the unified LoRA's
    # 1-step sampling timestep; Hyper-SDXL's 1-step UNet starts at 800 (docs/one_step.md)
    timestep: Optional[int] = None
    # where the unified LoRA samples ONE step, when not at ``timestep`` (the world's toy:
    # trained at 599, sampled at 699 — 1.31x instead of 1.59x the teacher, docs/one_step.md)
    sample_timestep: Optional[int] = None


@dataclass
class HyperSDSection:
    stages: list[StageSpec] = field(default_factory=_default_stages)
    num_ddim_timesteps: int = 50  # teacher DDIM solver grid, skip Δ = T/50 = 20 (LCM/PCM)
    w_min: float = 3.0  # teacher CFG w ~ U[w_min, w_max], scale 1 + w (LCM-LoRA scripts: 3–15)
    w_max: float = 15.0
    loss: Literal["l2", "huber"] = "l2"  # Hyper-SD: MSE
    huber_c: float = 0.001  # pseudo-Huber c (LCM scripts) when loss = huber
    target_ema_decay: float = 0.95  # θ⁻ = EMA of θ (LCM/PCM 0.95), reset at each stage start
    adversarial_weight: float = 0.0  # λ_adv of the optional PCM-style adversarial term
    discriminator_lr: Optional[float] = None  # None: train.lr
    gamma: float = 0.3  # TCD stochasticity (diffusers' eta; TCD default 0.3, Hyper-SD 1-step 1.0)
    guidance_scale: float = 1.0  # sampling/export CFG (the unified LoRA runs without CFG)
    served_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # unified LoRA
    export_steps: int = 4  # default steps in the model card / `diffdistill sample`
    reward: HyperSDRewardSection = field(default_factory=HyperSDRewardSection)
    score_distill: ScoreDistillSection = field(default_factory=ScoreDistillSection)


@dataclass
class HyperSDConfig(BaseConfig):
    hypersd: HyperSDSection = field(default_factory=HyperSDSection)

    def validate(self) -> None:
        super().validate()
        p = self.hypersd
        N = p.num_ddim_timesteps
        if N < 1:
            raise ConfigError(f"hypersd.num_ddim_timesteps must be >= 1, got {N}")
        if not p.stages:
            raise ConfigError("hypersd.stages is empty; e.g. [{segments: 8, steps: 1000}, "
                              "{segments: 4, ...}, {segments: 2, ...}, {segments: 1}]")
        for i, st in enumerate(p.stages):
            key = f"hypersd.stages[{i}]"
            if not 1 <= st.segments <= N:
                raise ConfigError(f"{key}.segments must be in [1, hypersd.num_ddim_timesteps="
                                  f"{N}], got {st.segments}")
            if st.steps is None and i != len(p.stages) - 1:
                raise ConfigError(f"{key}.steps is null; only the last stage may run to "
                                  "train.max_steps")
            if st.steps is not None and st.steps < 1:
                raise ConfigError(f"{key}.steps must be >= 1, got {st.steps}")
            if i and st.segments > p.stages[i - 1].segments:
                raise ConfigError(f"{key}.segments={st.segments} exceeds the previous stage's "
                                  f"{p.stages[i - 1].segments}: stages go from fine to coarse "
                                  "(8 → 4 → 2 → 1), each starting from the previous")
            if st.score_distill and st.segments != 1:
                raise ConfigError(f"{key}: score_distill is the one-step stage and needs "
                                  f"segments: 1, got {st.segments}")
        if not 0.0 <= p.w_min <= p.w_max:
            raise ConfigError(f"need 0 <= hypersd.w_min <= hypersd.w_max, got {p.w_min}, "
                              f"{p.w_max}")
        if p.huber_c <= 0:
            raise ConfigError(f"hypersd.huber_c must be > 0, got {p.huber_c}")
        if not 0.0 <= p.target_ema_decay < 1.0:
            raise ConfigError(f"hypersd.target_ema_decay must be in [0, 1), got "
                              f"{p.target_ema_decay}")
        if p.adversarial_weight < 0:
            raise ConfigError("hypersd.adversarial_weight must be >= 0 (0: off)")
        if p.discriminator_lr is not None and p.discriminator_lr <= 0:
            raise ConfigError("hypersd.discriminator_lr must be > 0 (or null for train.lr)")
        if not 0.0 <= p.gamma <= 1.0:
            raise ConfigError(f"hypersd.gamma must be in [0, 1], got {p.gamma}")
        if p.guidance_scale < 1.0:
            raise ConfigError(f"hypersd.guidance_scale must be >= 1 (1: no CFG), got "
                              f"{p.guidance_scale}")
        if not p.served_steps or any(not 1 <= s <= N for s in p.served_steps):
            raise ConfigError(f"hypersd.served_steps must be step counts in [1, {N}], got "
                              f"{p.served_steps}")
        if not 1 <= p.export_steps <= N:
            raise ConfigError(f"hypersd.export_steps must be in [1, {N}], got {p.export_steps}")
        r = p.reward
        if r.weight < 0:
            raise ConfigError(f"hypersd.reward.weight must be >= 0, got {r.weight}")
        if len(r.t_range) != 2 or not 0 <= r.t_range[0] <= r.t_range[1]:
            raise ConfigError(f"hypersd.reward.t_range must be [low, high] with "
                              f"0 <= low <= high, got {r.t_range}")
        if any(st.reward for st in p.stages) and not r.model.path:
            raise ConfigError("hypersd.reward.model.path is empty but a stage sets reward: "
                              "true; give the reward model's local weights (or world:clip)")
        if any(st.reward for st in p.stages) and r.model.kind == "aesthetic" and (
                not r.model.head_path):
            raise ConfigError("hypersd.reward.model.head_path is empty: the aesthetic reward "
                              "needs the LAION predictor's MLP weights (local file)")
        d = p.score_distill
        if d.guidance_scale <= 0 or d.weight < 0:
            raise ConfigError("hypersd.score_distill.guidance_scale must be > 0 and "
                              "hypersd.score_distill.weight >= 0")
        if d.fake_updates_per_generator_update < 1:
            raise ConfigError("hypersd.score_distill.fake_updates_per_generator_update must "
                              "be >= 1")
        if not 0.0 <= d.t_min < d.t_max <= 1.0:
            raise ConfigError(f"hypersd.score_distill.t_min/t_max must satisfy "
                              f"0 <= t_min < t_max <= 1, got {d.t_min}, {d.t_max}")
        if d.fake_lr is not None and d.fake_lr <= 0:
            raise ConfigError("hypersd.score_distill.fake_lr must be > 0 (or null)")


# ----------------------------------------------------------------------------- pieces


@torch.no_grad()
def sync_ema(ema, module: nn.Module) -> None:
    """Set an EMA's shadow (and a θ⁻ whose weights are that shadow) to ``module``'s weights."""
    params = dict(module.named_parameters())
    for n in ema.names:
        ema.shadow[n].copy_(params[n].detach().float())


@dataclass
class TSCDTerms:
    """One TSCD evaluation (what the adversarial term and the tests read)."""

    loss: Tensor  # per-sample d(f_θ(x_{t_{n+k}}; s), f_θ⁻(x̂_{t_n}; s))
    student_edge: Tensor  # f_θ(x_{t_{n+k}}, t_{n+k}; s) (with grad)
    target_edge: Tensor  # f_θ⁻(x̂_{t_n}, t_n; s)
    x_start: Tensor
    x_end: Tensor  # teacher DDIM step x̂_{t_n}
    t_start: Tensor
    t_end: Tensor
    edge: Tensor  # s, per sample
    w: Tensor
    cond: Cond  # prompt conditioning (with uncond, for the teacher's CFG)
    prompts: list
    extra: list = field(default_factory=list)  # student predictions for ``extra_inputs``


# ----------------------------------------------------------------------------- trainer


class HyperSDTrainer(BackboneMixin, Trainer):
    method = "hypersd"
    config_class = HyperSDConfig
    resume_must_match = Trainer.resume_must_match + ("hypersd.stages",)

    def fsdp_unsupported(self) -> Optional[str]:
        return ("Hyper-SD keeps θ⁻ as a module copy of the student (the EMA target); use "
                "configs/accelerate/multi_gpu.yaml")

    # -- build ----------------------------------------------------------------------
    @property
    def lora(self) -> bool:
        return self.cfg.adapter.type == "lora"

    def build(self) -> None:
        from diffdistill.adapters import (
            adapters_disabled,
            clone_unet,
            make_trainable,
            set_attention_backend,
        )

        cfg, p = self.cfg, self.cfg.hypersd
        bb = self.load_backbone()
        if bb.kind == "pixel" or bb.schedule.kind != "vp":
            raise ConfigError(f"model.path={cfg.model.path!r} holds a {bb.kind} model; Hyper-SD "
                              "distils latent text-to-image VP teachers (SD / SDXL structure)")
        bb.scheduler_config["prediction_type"] = bb.prediction_type  # the export's scheduler
        T = bb.schedule.num_train_timesteps
        N = p.num_ddim_timesteps
        if N > T:
            raise ConfigError(f"hypersd.num_ddim_timesteps={N} exceeds the teacher's T={T}")
        for key in ("timestep", "sample_timestep"):
            tc = getattr(p.score_distill, key)
            if tc is not None and not 0 < tc < T:
                raise ConfigError(f"hypersd.score_distill.{key}={tc} must be in (0, T={T})")
        from diffdistill.sampling import lcm_timesteps

        self.T, self.skip = T, T // N
        self.solver_grid = lcm_timesteps(N, N, T).double()  # τ_j = jΔ − 1: LCD's grid
        self.edges = {st.segments: segment_edges(st.segments, N, T) for st in p.stages}
        self.stage_ends = self._stage_ends()
        self._check_reward_range()
        self.distance: Callable[[Tensor, Tensor], Tensor] = (
            functools.partial(elementwise_huber, c=p.huber_c) if p.loss == "huber" else l2)
        self.shape = grid_shape(bb, cfg.data.resolution)
        frozen_dtype = self.frozen_dtype
        kw = self.adapter_kwargs()
        score_distill = any(st.score_distill for st in p.stages)

        teacher = bb.unet.requires_grad_(False).eval()
        fake_unet = None
        if self.lora:
            # the fake score's structure is copied before the student's adapter exists
            fake_unet = shared_weights_copy(teacher) if score_distill else None
            make_trainable(teacher, adapter_name="default", frozen_dtype=frozen_dtype, **kw)
            self.unet = self.add_optimizer("unet", teacher)
            raw = self.unwrap(self.unet)
            self.teacher = bb.denoiser(raw)  # the same UNet with its adapters disabled
            self.teacher_context = functools.partial(adapters_disabled, raw)
        else:
            fake_unet = clone_unet(teacher) if score_distill else None
            student = clone_unet(teacher)
            make_trainable(student, **kw)
            set_attention_backend(student, cfg.model.attention)
            teacher.to(frozen_dtype)
            self.unet = self.add_optimizer("unet", student)
            self.teacher = bb.denoiser(teacher)
            self.teacher_context = contextlib.nullcontext
        self.student = bb.denoiser(self.unet)
        target_ema = self.add_ema("target", self.unet, p.target_ema_decay)
        self.target = bb.denoiser(ema_backed_copy(self.unwrap(self.unet), target_ema,
                                                   share_frozen=True))
        self.add_eval_ema("unet", self.unet)

        self.fake_score = None
        if fake_unet is not None:
            if self.lora:
                make_trainable(fake_unet, adapter_name="fake_score", frozen_dtype=frozen_dtype,
                               **kw)
            else:
                make_trainable(fake_unet, **kw)
            self.fake_score = self.add_optimizer("fake_score", fake_unet,
                                                 lr=p.score_distill.fake_lr)
            d = p.score_distill
            self.dm = DistributionMatching(
                self, real=self.real_denoiser, fake_score=self.fake_score,
                t_range=(int(d.t_min * T), min(int(d.t_max * T), T - 1)),
                guidance_scale=d.guidance_scale)
        self.discriminator = None
        if p.adversarial_weight > 0:
            from diffdistill.gan import DiscriminatorHead, bottleneck_channels

            head = DiscriminatorHead(bottleneck_channels(self.teacher.unet)).to(self.device)
            self.discriminator = self.add_optimizer("discriminator", head,
                                                    lr=p.discriminator_lr)
        self.reward_model = None
        if any(st.reward for st in p.stages):
            from .common import load_reward_from

            self.reward_model = load_reward_from(p.reward.model, "hypersd.reward.model",
                                                 self.device)

    def _stage_ends(self) -> list[float]:
        stages = self.cfg.hypersd.stages
        ends = [float(e) for e in itertools.accumulate(st.steps or 0 for st in stages)]
        ends[-1] = float("inf")  # the last stage continues to train.max_steps
        if len(stages) > 1 and ends[-2] >= self.cfg.train.max_steps:
            log.warning("train.max_steps=%d ends before the last stage (stage %d starts at step "
                        "%d): later hypersd.stages never run", self.cfg.train.max_steps,
                        len(stages) - 1, int(ends[-2]))
        return ends

    def _check_reward_range(self) -> None:
        p = self.cfg.hypersd
        lo, hi = p.reward.t_range
        for i, st in enumerate(p.stages):
            chain = reward_chain(st.segments, p.num_ddim_timesteps, self.T)
            if st.reward and not bool(((chain >= lo) & (chain <= hi)).any()):
                raise ConfigError(f"hypersd.reward.t_range={p.reward.t_range} holds no step of "
                                  f"stage {i}'s {st.segments}-step chain {chain.long().tolist()}")

    # -- stages ---------------------------------------------------------------------
    def stage_index(self, step: Optional[int] = None) -> int:
        """The stage of optimizer step ``step`` (default: the one being taken)."""
        step = self.global_step if step is None else step
        return next(i for i, end in enumerate(self.stage_ends) if step < end)

    def stage_start(self, index: int) -> int:
        return 0 if index == 0 else int(self.stage_ends[index - 1])

    def enter_stage(self) -> int:
        """Index of the current stage; at a stage's first step θ⁻ is reset to θ."""
        i = self.stage_index()
        if self.state.get("stage") != i:
            sync_ema(self.emas["target"][0], self.unwrap(self.unet))
            self.state["stage"] = i
        return i

    # -- TSCD -----------------------------------------------------------------------
    def student_forward(self, inputs: list[tuple[Tensor, Tensor]], cond: Cond
                        ) -> list[Prediction]:
        """The student on every (x, t) of ``inputs`` in ONE batched forward (each with ``cond``).

        One grad-carrying forward per step: DDP marks each parameter's gradient ready once per
        backward, and several forwards before one backward would break that."""
        sizes = [x.shape[0] for x, _ in inputs]
        x = torch.cat([x for x, _ in inputs])
        t = torch.cat([torch.as_tensor(t, dtype=torch.float64).cpu().flatten().expand(n)
                       for (_, t), n in zip(inputs, sizes)])
        pred = self.student(x, t, Cond.cat([cond] * len(inputs)) if len(inputs) > 1 else cond)
        return [Prediction(a, b) for a, b in zip(pred.x0.split(sizes), pred.eps.split(sizes))]

    def tscd_terms(self, batch: dict, num_segments: int,
                   extra_inputs: Optional[Callable[[Cond], list]] = None) -> TSCDTerms:
        """The trajectory-segmented consistency loss for one batch (module docstring).

        ``extra_inputs(student_cond) -> [(x, t), …]``: more student evaluations (reward,
        one-step sample) batched into the same forward; their predictions land in ``.extra``.
        """
        from diffdistill.sampling import ddim_solver_step

        p, sched = self.cfg.hypersd, self.backbone.schedule
        x0 = self.encode_x0(batch)
        cond = self.cond_for_batch(batch, with_uncond=True)
        n = x0.shape[0]
        edges = self.edges[num_segments]
        index = self.randint(0, p.num_ddim_timesteps, (n,)).cpu()
        t_start = self.solver_grid[index]
        edge = edges[segment_index(t_start, edges)]
        t_end = (t_start - self.skip).clamp(min=0.0)
        noise = self.randn(*x0.shape)
        x_start = sched.add_noise(x0, noise, t_start)
        w = p.w_min + (p.w_max - p.w_min) * self.rand(n)
        student_cond = cond.replace(uncond=None)
        extra = extra_inputs(student_cond) if extra_inputs is not None else []
        preds = self.student_forward([(x_start, t_start), *extra], student_cond)
        student_edge = segment_jump(preds[0], sched, x_start, t_start, edge)
        with torch.no_grad():
            with self.teacher_context():
                pred = self.teacher.guided(x_start, t_start, cond, guidance_scale=1.0 + w)
            x_end = ddim_solver_step(pred, sched, t_start, t_end)
            target_edge = segment_jump(self.target(x_end, t_end, student_cond), sched, x_end,
                                       t_end, edge)
        return TSCDTerms(loss=self.distance(student_edge, target_edge),
                         student_edge=student_edge, target_edge=target_edge, x_start=x_start,
                         x_end=x_end, t_start=t_start, t_end=t_end, edge=edge, w=w, cond=cond,
                         prompts=list(batch["caption"]), extra=preds[1:])

    # -- adversarial term -------------------------------------------------------------
    def discriminator_logits(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Head logits on the frozen teacher UNet's bottleneck features of (x, t)."""
        from diffdistill.gan import BottleneckTap

        tap = BottleneckTap(self.teacher.unet)
        try:
            with self.teacher_context():
                self.teacher.raw(x, t.to(x.device, torch.float32), cond)
            features = tap.pop()
        finally:
            tap.remove()
        return self.discriminator(features)

    def discriminator_loss(self, terms: TSCDTerms) -> Tensor:
        """softplus(−D(target jump)) + softplus(D(student jump)), both at the edge s."""
        cond = terms.cond.replace(uncond=None)
        x = torch.cat([terms.target_edge, terms.student_edge.detach()])
        logits = self.discriminator_logits(x, torch.cat([terms.edge, terms.edge]),
                                           Cond.cat([cond, cond]))
        l_real, l_fake = gan_discriminator_loss(*logits.chunk(2))
        return (l_real + l_fake).mean()

    # -- human feedback (ReFL) ----------------------------------------------------------
    @torch.no_grad()
    def reward_input(self, cond: Cond, num_segments: int) -> tuple[Tensor, Tensor]:
        """(x_{c_j}, c_j): the stage's k-step chain (γ = 0 jumps, no gradient) from pure noise
        to a step c_j drawn uniformly among those in ``reward.t_range``."""
        p, sched = self.cfg.hypersd, self.backbone.schedule
        chain = reward_chain(num_segments, p.num_ddim_timesteps, self.T)
        lo, hi = p.reward.t_range
        allowed = torch.nonzero((chain >= lo) & (chain <= hi)).flatten()
        j = int(allowed[self.randint(0, len(allowed), (1,)).cpu()])
        x = self.randn(cond.batch_size, *self.shape)  # VP: x at t = T−1 is the noise itself
        for m in range(j):
            t, s = float(chain[m]), float(chain[m + 1])
            x = segment_jump(self.student(x, t, cond), sched, x, t, s)
        return x, chain[j]

    def reward(self, pred: Prediction, prompts: list) -> Tensor:
        """R(decode(x0̂), prompt) per sample, differentiable through the VAE decoder."""
        return self.reward_model(self.backbone.decode_latents(pred.x0), prompts)

    # -- score distillation -----------------------------------------------------------
    def is_generator_step(self, stage: int) -> bool:
        ratio = self.cfg.hypersd.score_distill.fake_updates_per_generator_update
        return ttur_generator_step(self.global_step, ratio, start=self.stage_start(stage))

    def sample_t(self, n: int) -> Tensor:
        return self.dm.sample_t(n)

    @property
    def onestep_timestep(self) -> int:
        """The one-step generator's conditioning timestep (``score_distill.timestep``, T−1)."""
        t = self.cfg.hypersd.score_distill.timestep
        return self.T - 1 if t is None else int(t)

    def onestep_input(self, cond: Cond) -> tuple[Tensor, Tensor]:
        """(ε, t_c): the one-step generator's input; its sample is x = x0̂_θ(ε, t_c)."""
        noise = self.randn(cond.batch_size, *self.shape)
        return noise, torch.full((noise.shape[0],), float(self.onestep_timestep),
                                 dtype=torch.float64)

    def distribution_matching_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, dict]:
        """DMD2's L_DM on samples ``x`` (call with the fake score's weights frozen)."""
        return self.dm.generator_loss(x, cond)

    def fake_score_loss(self, x: Tensor, cond: Cond) -> Tensor:
        """The fake score's denoising loss (the teacher's own target) on detached samples."""
        return self.dm.fake_score_loss(x.detach(), cond)[0]

    @contextlib.contextmanager
    def real_denoiser(self):
        """The frozen teacher (adapters off for a LoRA student), the DM's real score."""
        with self.teacher_context():
            yield self.teacher

    # -- the step -------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        p = self.cfg.hypersd
        i = self.enter_stage()
        stage = p.stages[i]
        logs: dict = {"stage": torch.tensor(float(i)),
                      "segments": torch.tensor(float(stage.segments))}
        dm_step = stage.score_distill and self.is_generator_step(i)
        extra_keys = (["reward"] if stage.reward else []) + (
            ["onestep"] if stage.score_distill else [])

        def extra_inputs(cond: Cond) -> list:
            inputs = {"reward": lambda: self.reward_input(cond, stage.segments),
                      "onestep": lambda: self.onestep_input(cond)}
            return [inputs[k]() for k in extra_keys]

        # the adversarial term's gradient reaches the student through the head, not into it
        head = self.unwrap(self.discriminator) if self.discriminator is not None else None
        with frozen(head):
            terms = self.tscd_terms(batch, stage.segments, extra_inputs)
            extra = dict(zip(extra_keys, terms.extra))
            loss_tscd = terms.loss.mean()
            loss = loss_tscd
            logs["loss_tscd"] = loss_tscd.detach()
            student_cond = terms.cond.replace(uncond=None)
            if self.discriminator is not None:
                logits = self.discriminator_logits(terms.student_edge, terms.edge, student_cond)
                loss_adv = gan_generator_loss(logits).mean()
                loss = loss + p.adversarial_weight * loss_adv
                logs["loss_adv"] = loss_adv.detach()
            if stage.reward:
                reward = self.reward(extra["reward"], terms.prompts)
                loss = loss - p.reward.weight * reward.mean()
                logs["reward"] = reward.detach().mean()
            x_onestep = extra["onestep"].x0.float() if stage.score_distill else None
            if dm_step:
                loss_dm, dm_logs = self.distribution_matching_loss(x_onestep, terms.cond)
                loss = loss + p.score_distill.weight * loss_dm
                logs.update(dm_logs)
            self.step("unet", loss)
        logs["loss"] = loss.detach()
        if self.discriminator is not None:
            loss_d = self.discriminator_loss(terms)
            self.step("discriminator", loss_d)
            logs["loss_discriminator"] = loss_d.detach()
        if x_onestep is not None:
            loss_f = self.fake_score_loss(x_onestep.detach(), student_cond)
            self.step("fake_score", loss_f)
            logs["loss_fake"] = loss_f.detach()
        return logs

    # -- sampling / export ------------------------------------------------------------
    def generator_unet(self) -> nn.Module:
        """The network to sample from / export (the evaluation EMA when train.ema_decay > 0)."""
        return self.ema_or_online("unet", self.unet)

    @property
    def onestep_sample_timestep(self) -> Optional[int]:
        """Where one-step sampling starts (``sample_timestep``, else ``timestep``; None: the
        TCD grid's own first point)."""
        sd = self.cfg.hypersd.score_distill
        t = sd.sample_timestep if sd.sample_timestep is not None else sd.timestep
        return None if t is None else int(t)

    def tcd_timesteps(self, num_steps: int) -> Tensor:
        """TCD's grid for ``num_steps``; one step starts at :attr:`onestep_sample_timestep`."""
        from diffdistill.sampling import tcd_timesteps

        if num_steps == 1 and self.onestep_sample_timestep is not None:
            return torch.tensor([self.onestep_sample_timestep], dtype=torch.int64)
        return tcd_timesteps(num_steps, self.cfg.hypersd.num_ddim_timesteps,
                             num_train_timesteps=self.T)

    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        p, bb = self.cfg.hypersd, self.backbone
        return EvalModel(self.method, bb, bb.denoiser(unet if unet is not None else self.generator_unet()), "tcd",
                         guidance_scale=p.guidance_scale, timesteps=self.tcd_timesteps,
                         sampler_opts={"gamma": p.gamma})


    def reward_networks(self) -> list[dict]:
        """The ReFL reward network, when a stage trained against it."""
        from .common import reward_network_record

        p = self.cfg.hypersd
        return [reward_network_record(p.reward.model)] if any(st.reward for st in p.stages) else []

    def export(self, out_dir: Path) -> Optional[Path]:
        from diffdistill.export import save_generator, write_export_info, write_model_card

        p, bb = self.cfg.hypersd, self.backbone
        out_dir = Path(out_dir)
        N = p.num_ddim_timesteps
        sched_kwargs = {} if N == 50 else {"original_inference_steps": N}
        unet = self.generator_unet()
        save_generator(bb, unet, out_dir, lora=self.lora, scheduler="tcd",
                       scheduler_kwargs=sched_kwargs)
        stages = [f"{st.segments}{' +DM' if st.score_distill else ''}"
                  f"{' +reward' if st.reward else ''} ({st.steps or 'rest'})" for st in p.stages]
        write_model_card(
            out_dir, prompt=self.card_prompt(),
            method=self.method, base_model=resolve_model_path(self.cfg.model.path),
            steps=p.export_steps, guidance_scale=p.guidance_scale, scheduler="tcd",
            lora=self.lora, kind=bb.kind, scheduler_kwargs=sched_kwargs if self.lora else None,
            call_kwargs={"eta": p.gamma},
            extra={"adapter": self.cfg.adapter.type, "served steps": p.served_steps,
                   "TCD gamma (diffusers eta)": p.gamma,
                   "stages (segments, steps)": " → ".join(stages),
                   "teacher CFG w range": f"[{p.w_min}, {p.w_max}]",
                   "1-step timestep (pass timesteps=[t] for one step)":
                       int(self.tcd_timesteps(1)[0]),
                   "DDIM solver timesteps": N})
        more = [1] if self.onestep_sample_timestep is not None else []  # its one-step start
        write_export_info(out_dir, **self.eval_spec(unet).export_info(p.export_steps, more),
                          served_steps=list(p.served_steps), original_inference_steps=N,
                          method=self.method, adapter=self.cfg.adapter.type,
                          reward_networks=self.reward_networks())
        return out_dir
