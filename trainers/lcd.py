"""Latent consistency distillation (LCD / LCM / LCM-LoRA) and reward-guided LCD (RG-LCD).

**LCD** (Luo et al. 2023, "Latent Consistency Models", Alg. 1 with the one-stage guided
distillation of Sec. 4.2 and the skipping step of Sec. 4.3; LCM-LoRA, Luo et al. 2023b).
Sample a DDIM-solver index n, t_{n+k} from the grid t = (i+1)k − 1 with k = T / N (N = 50
DDIM timesteps over T = 1000 → k = 20), w ~ U[w_min, w_max], and

    x_{t_{n+k}} = α x0 + σ ε                                     (forward noising)
    x0̂, ε̂ = p_c + w (p_c − p_u) for p = teacher (x0̂, ε̂)          (LCM-form CFG)
    x̂_{t_n} = α_{t_n} x0̂ + σ_{t_n} ε̂                              (DDIM solver Ψ)
    L = d(f_θ(x_{t_{n+k}}, w, t_{n+k}), f_θ⁻(x̂_{t_n}, w, t_n))

with f the LCM boundary-conditioned consistency function (c_skip = σd²/((10t)²+σd²),
c_out = 10t/sqrt((10t)²+σd²), σd = 0.5) and d the element-wise pseudo-Huber (c = 0.001) or
L2. At the first grid entry t_n = −1: the solver lands at ᾱ₀ (LCM's solver, whatever the
teacher's ``set_alpha_to_one``) and the target is
taken at t = 0, where the boundary condition makes it x̂_{t_n} itself (f(x, 0) = x). The
solver step is :func:`diffdistill.sampling.ddim_solver_step`, shared with ``sample_ddim``.

* ``adapter.type=full`` — the student is a copy of the teacher in a UNet with
  ``time_cond_proj_dim``: w enters through ``guidance_scale_embedding`` (the embedding of w,
  i.e. of ``guidance_scale − 1`` at inference), the new projection zero-initialised so the
  student starts as the teacher; θ⁻ is an EMA of the student (decay 0.95).
* ``adapter.type=lora`` — LCM-LoRA: a LoRA on the teacher's own UNet; the teacher pass runs
  the same UNet with adapters disabled (no second copy in memory); θ⁻ is the online student
  under ``no_grad``; the student has no w input.

Exports: full → a stock pipeline folder with ``LCMScheduler`` (``LatentConsistencyModelPipeline``
for SD, which embeds w = guidance_scale − 1); LoRA → ``pytorch_lora_weights.safetensors``
(diffusers) + ``lora_kohya.safetensors`` for a stock pipeline with ``LCMScheduler``. Both
carry a model card and ``diffdistill_export.json`` (sampler, steps, guidance, timesteps).

**RG-LCD** (Li, Feng, Chen & Wang 2024, "Reward Guided Latent Consistency Distillation"):
L = L_LCD − β·R(decode(x0̂), prompt), where x0̂ = f_θ(x_{t_{n+k}}, t_{n+k}) is the student's
one-step prediction. ``rglcd.mode=direct`` backpropagates through the VAE decoder into the
expert reward model; ``rglcd.mode=lrm`` trains a latent proxy reward model online to match the
expert's preferences (KL between softmaxed scores over {student x0̂, target x0̂, ground-truth
latent}) and the student maximises the proxy's reward on latents (no decode), which the paper
shows reduces reward over-optimisation.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import nn

from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond, LCMConsistency, guidance_scale_embedding
from diffdistill.losses import elementwise_huber, l2
from diffdistill.world import resolve_model_path

from .base import Trainer
from .common import BackboneMixin
from .ema import ema_backed_copy

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- configs


@dataclass
class LCDSection:
    num_ddim_timesteps: int = 50  # DDIM solver grid: skipping step k = T // 50 = 20 (LCM)
    w_min: float = 5.0  # w ~ U[w_min, w_max], LCM form w = CFG − 1 (LCM scripts: 5 SD, 3 SDXL)
    w_max: float = 15.0  # (LCM scripts)
    loss: Literal["huber", "l2"] = "huber"  # LCM scripts' default
    huber_c: float = 0.001  # element-wise pseudo-Huber c (LCM scripts)
    target_ema_decay: float = 0.95  # full: θ⁻ = EMA of the student (LCM); LoRA: online weights
    time_cond_proj_dim: int = 256  # full: size of the w embedding (LCM; unused for LoRA)
    # Sampling / export guidance. full: the LCM pipeline embeds w = guidance_scale − 1 (None:
    # 8.5, its default); LoRA: classifier-free guidance on top (None: 1.0 = off, LCM-LoRA's).
    guidance_scale: Optional[float] = None
    export_steps: int = 4  # LCM steps recorded in the export (LCM: 1–8)
    # Where ONE-step sampling starts (a solver-grid timestep; None: T − 1, LCMScheduler's own).
    # The single step maps x_t → x0̂ with σ_t/α_t magnifying the output's error (14.6 at 999
    # on SD's schedule): the world's toy students sample best from 759 (docs/one_step.md).
    onestep_timestep: Optional[int] = None


@dataclass
class LCDConfig(BaseConfig):
    lcd: LCDSection = field(default_factory=LCDSection)

    def validate(self) -> None:
        super().validate()
        p = self.lcd
        if p.num_ddim_timesteps < 1:
            raise ConfigError(f"lcd.num_ddim_timesteps must be >= 1, got {p.num_ddim_timesteps}")
        if not 0.0 <= p.w_min <= p.w_max:
            raise ConfigError(f"need 0 <= lcd.w_min <= lcd.w_max, got {p.w_min}, {p.w_max}")
        if p.huber_c <= 0:
            raise ConfigError(f"lcd.huber_c must be > 0, got {p.huber_c}")
        if not 0.0 <= p.target_ema_decay < 1.0:
            raise ConfigError(f"lcd.target_ema_decay must be in [0, 1), got {p.target_ema_decay}")
        if p.time_cond_proj_dim < 1:
            raise ConfigError("lcd.time_cond_proj_dim must be >= 1")
        if p.guidance_scale is not None and p.guidance_scale < 1.0:
            raise ConfigError(f"lcd.guidance_scale must be >= 1 (w = scale − 1 >= 0), got "
                              f"{p.guidance_scale}")
        if not 1 <= p.export_steps <= p.num_ddim_timesteps:
            raise ConfigError(f"lcd.export_steps must be in [1, lcd.num_ddim_timesteps="
                              f"{p.num_ddim_timesteps}], got {p.export_steps}")
        if p.onestep_timestep is not None and p.onestep_timestep < 0:
            raise ConfigError(f"lcd.onestep_timestep must be >= 0, got {p.onestep_timestep}")


@dataclass
class RGLCDSection:
    mode: Literal["direct", "lrm"] = "direct"  # expert RM through the VAE, or latent proxy RM
    beta: float = 1.0  # reward weight β (RG-LCD reference: reward_scale 1)


@dataclass
class RewardSection:
    # HPSv2.1: RG-LCD's headline expert; ImageReward: ReFL's / Hyper-SD's
    kind: Literal["clip", "hpsv2", "pickscore", "aesthetic", "imagereward"] = "hpsv2"
    path: str = ""  # local weights: open_clip file or folder (clip, hpsv2), CLIPModel folder
    # (pickscore), ImageReward folder (imagereward: BLIP config + weights, head, mean/std)
    model_name: Optional[str] = None  # open_clip architecture of a weights file (hpsv2: ViT-H-14)
    config_path: Optional[str] = None  # open_clip model-config JSON registering a custom arch
    processor_path: Optional[str] = None  # pickscore / imagereward: tokenizer (default: path)
    head_path: Optional[str] = None  # aesthetic: the LAION predictor's MLP; imagereward: its MLP


@dataclass
class LRMSection:
    width: int = 64  # conv trunk width of the latent proxy reward model
    depth: int = 3  # stride-2 stages
    text: bool = True  # condition on the pooled prompt embedding
    # A fresh small net needs more than the reference's 3.3e-6 (a pretrained latent ViT).
    lr: float = 1e-4
    expert_logit_scale: Optional[float] = None  # None: the reward model's own logit scale
    loss_weight: float = 1.0  # scale of the LRM's KL loss (reference rm_loss_scale 1)
    # "softmax": one KL over the 3-way softmax of the triplet; "pairwise": the sum of the three
    # pairwise KLs, as RG-LCD's reference code does
    loss: Literal["softmax", "pairwise"] = "softmax"


@dataclass
class RGLCDConfig(LCDConfig):
    rglcd: RGLCDSection = field(default_factory=RGLCDSection)
    reward: RewardSection = field(default_factory=RewardSection)
    lrm: LRMSection = field(default_factory=LRMSection)

    def validate(self) -> None:
        super().validate()
        if self.rglcd.beta < 0:
            raise ConfigError(f"rglcd.beta must be >= 0, got {self.rglcd.beta}")
        if not self.reward.path:
            raise ConfigError("reward.path is empty: give the expert reward model's local "
                              "weights (file or folder, or world:NAME)")
        if self.lrm.width < 1 or self.lrm.depth < 1:
            raise ConfigError("lrm.width and lrm.depth must be >= 1")
        if self.lrm.lr <= 0:
            raise ConfigError(f"lrm.lr must be > 0, got {self.lrm.lr}")


# ----------------------------------------------------------------------------- pieces


def lcm_student_unet(teacher: nn.Module, time_cond_proj_dim: int = 256) -> nn.Module:
    """The teacher's weights in a UNet with a w-embedding input that starts as the teacher.

    Built from the teacher's config plus ``time_cond_proj_dim``; every teacher weight is
    loaded and the one new layer, ``time_embedding.cond_proj`` (no bias), is zeroed, so
    ``student(x, t, timestep_cond=any)`` equals ``teacher(x, t)`` before training.
    """
    from diffusers import UNet2DConditionModel

    if getattr(teacher.config, "time_cond_proj_dim", None) is not None:
        raise ConfigError("the teacher UNet already has a guidance embedding "
                          "(time_cond_proj_dim): it is an LCM, not a diffusion teacher")
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config,
                                                "time_cond_proj_dim": int(time_cond_proj_dim)})
    state = {k: v.float() for k, v in teacher.state_dict().items()}
    result = student.load_state_dict(state, strict=False)
    new = {"time_embedding.cond_proj.weight"}
    if set(result.missing_keys) != new or result.unexpected_keys:
        raise RuntimeError(f"student/teacher mismatch: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher.parameters()).device)


def pooled_text(cond: Cond) -> Tensor:
    """Mean of the prompt's token embeddings: the latent reward model's text input."""
    return cond.encoder_hidden_states.float().mean(dim=1)


@dataclass
class LCDTerms:
    """One LCD evaluation (Alg. 1): everything RG-LCD's reward terms need as well."""

    loss: Tensor  # per-sample d(f_θ(x_{t_{n+k}}), f_θ⁻(x̂_{t_n}))
    student_x0: Tensor  # f_θ(x_{t_{n+k}}, w, t_{n+k}): the one-step x0̂ (with grad)
    target_x0: Tensor  # f_θ⁻(x̂_{t_n}, w, t_n)
    x0: Tensor  # ground-truth latents
    x_start: Tensor  # x_{t_{n+k}}
    x_end: Tensor  # x̂_{t_n} (teacher DDIM step)
    t_start: Tensor
    t_end: Tensor  # t_n; −1 means DDIM's final alpha
    w: Tensor
    cond: Cond  # prompt conditioning (with uncond)
    prompts: list


# ----------------------------------------------------------------------------- LCD


class LCDTrainer(BackboneMixin, Trainer):
    method = "lcd"
    config_class = LCDConfig
    trains_flow_transformers = True  # SD3-class teachers: LCM-LoRA along the flow ODE

    # -- build ----------------------------------------------------------------------
    def build(self) -> None:
        cfg, p = self.cfg, self.cfg.lcd
        bb = self.load_backbone()
        if bb.kind == "pixel":
            raise ConfigError(f"model.path={cfg.model.path!r} holds a pixel model; LCD distils "
                              "latent text-to-image teachers (SD / SDXL structure)")
        self.flow = bb.schedule.kind == "flow"
        bb.scheduler_config["prediction_type"] = bb.prediction_type  # the export's scheduler
        T = bb.schedule.num_train_timesteps
        if p.num_ddim_timesteps > T:
            raise ConfigError(f"lcd.num_ddim_timesteps={p.num_ddim_timesteps} exceeds the "
                              f"teacher's T={T}")
        from diffdistill.sampling import lcm_timesteps

        self.skip = T // p.num_ddim_timesteps  # k
        # t = (i+1)k − 1, i < N: the solver grid, which is also LCMScheduler's training grid
        self.solver_grid = lcm_timesteps(p.num_ddim_timesteps, p.num_ddim_timesteps, T).double()
        if p.onestep_timestep is not None and p.onestep_timestep not in self.solver_grid:
            grid = self.solver_grid.long().flip(0).tolist()
            raise ConfigError(f"lcd.onestep_timestep={p.onestep_timestep} is not on the solver "
                              f"grid the student trains at ({grid[0]}, {grid[1]}, … "
                              f"{grid[-1]}: (i+1)·{self.skip} − 1)")
        self.distance: Callable[[Tensor, Tensor], Tensor] = (
            functools.partial(elementwise_huber, c=p.huber_c) if p.loss == "huber" else l2)
        gs = p.guidance_scale
        if cfg.adapter.type == "full":
            self._build_full(8.5 if gs is None else gs)
        else:
            self._build_lora(1.0 if gs is None else gs)
        self.student = self.consistency(bb.denoiser(self.unet))
        self.add_eval_ema("unet", self.unet)

    def fsdp_unsupported(self) -> Optional[str]:
        if self.cfg.adapter.type == "full":
            return ("full-weight LCD keeps θ⁻ as a module copy of the student (the EMA target "
                    "of lcd.target_ema_decay); use configs/accelerate/multi_gpu.yaml or "
                    "deepspeed_zero2.yaml")
        return None

    def _build_full(self, guidance_scale: float) -> None:
        cfg, p, bb = self.cfg, self.cfg.lcd, self.backbone
        from diffdistill.adapters import make_trainable, set_attention_backend

        if self.flow:  # a flow transformer has no w input to add: the CFG range is distilled
            from diffdistill.adapters import clone_unet  # into the weights, as LCM-LoRA does

            student = clone_unet(bb.unet)
        else:
            student = lcm_student_unet(bb.unet, p.time_cond_proj_dim)
        make_trainable(student, **self.adapter_kwargs(adapter="full"))
        set_attention_backend(student, cfg.model.attention)
        bb.unet.to(self.frozen_dtype)  # the frozen teacher
        self.unet = self.add_optimizer("unet", student)
        ema = self.add_ema("target", self.unet, p.target_ema_decay)
        self.teacher = bb.denoiser()
        self.teacher_context = contextlib.nullcontext
        self.target = self.consistency(bb.denoiser(ema_backed_copy(self.unwrap(self.unet), ema)))
        self.w_dim: Optional[int] = None if self.flow else p.time_cond_proj_dim
        # the LCM pipeline embeds w = guidance_scale − 1 and runs no CFG
        self.export_guidance_scale = 1.0 if self.flow else guidance_scale

    def _build_lora(self, guidance_scale: float) -> None:
        bb = self.backbone
        from diffdistill.adapters import adapters_disabled, make_trainable

        make_trainable(bb.unet, **self.adapter_kwargs(adapter="lora",
                                                      frozen_dtype=self.frozen_dtype))
        self.unet = self.add_optimizer("unet", bb.unet)
        raw = self.unwrap(self.unet)
        self.teacher = bb.denoiser(raw)  # the same UNet, run with its LoRA disabled
        self.teacher_context = functools.partial(adapters_disabled, raw)
        self.target = self.consistency(bb.denoiser(raw))  # online weights, under no_grad
        self.w_dim = None
        self.export_guidance_scale = guidance_scale

    def consistency(self, denoiser):
        """The consistency function f(x, t) over a denoiser: LCM's boundary scalings on a VP
        teacher (Luo et al. 2023, Eq. 9); on a rectified flow x0̂ = x − σ v̂ itself, which
        already meets the boundary condition f(x, 0) = x."""
        return denoiser if self.flow else LCMConsistency(denoiser)

    def w_embedding(self, w) -> Optional[Tensor]:
        """The student's guidance input (None for LCM-LoRA, which has none)."""
        if self.w_dim is None:
            return None
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        return guidance_scale_embedding(w, self.w_dim).to(self.device)

    # -- the step -------------------------------------------------------------------
    def consistency_terms(self, batch: dict) -> LCDTerms:
        """LCD Alg. 1 for one batch (the student's output keeps its graph)."""
        p, bb = self.cfg.lcd, self.backbone
        x0 = self.encode_x0(batch)
        cond = self.cond_for_batch(batch, with_uncond=True)
        n = x0.shape[0]
        index = self.randint(0, p.num_ddim_timesteps, (n,)).cpu()
        t_start = self.solver_grid[index]
        t_end = t_start - self.skip
        noise = self.randn(*x0.shape)
        x_start = bb.schedule.add_noise(x0, noise, t_start)
        w = p.w_min + (p.w_max - p.w_min) * self.rand(n)
        student_cond = cond.replace(uncond=None, timestep_cond=self.w_embedding(w))
        student_x0 = self.student(x_start, t_start, student_cond).x0
        with torch.no_grad():
            from diffdistill.sampling import ddim_solver_step

            with self.teacher_context():
                pred = self.teacher.guided(x_start, t_start, cond, guidance_scale=1.0 + w)
            # LCM's solver always lands on ᾱ₀ at the first grid entry (t_end = −1)
            x_end = ddim_solver_step(pred, bb.schedule, t_start, t_end, end="first")
            target_x0 = self.target(x_end, t_end.clamp(min=0), student_cond).x0
        return LCDTerms(loss=self.distance(student_x0, target_x0), student_x0=student_x0,
                        target_x0=target_x0, x0=x0, x_start=x_start, x_end=x_end,
                        t_start=t_start, t_end=t_end, w=w, cond=cond,
                        prompts=list(batch["caption"]))

    def train_step(self, batch: dict) -> dict[str, float]:
        terms = self.consistency_terms(batch)
        loss = terms.loss.mean()
        self.step("unet", loss)
        return {"loss": loss.detach(), "w": terms.w.mean()}

    # -- sampling / export ------------------------------------------------------------
    def generator_unet(self) -> nn.Module:
        """The network to sample from / export (the evaluation EMA when train.ema_decay > 0)."""
        return self.ema_or_online("unet", self.unet)

    def lcm_timesteps(self, num_steps: int) -> Tensor:
        """LCMScheduler's grid for ``num_steps``; one step starts at ``lcd.onestep_timestep``."""
        from diffdistill.sampling import lcm_timesteps

        p = self.cfg.lcd
        if num_steps == 1 and p.onestep_timestep is not None:
            return torch.tensor([p.onestep_timestep], dtype=torch.int64)
        return lcm_timesteps(num_steps, p.num_ddim_timesteps,
                             self.backbone.schedule.num_train_timesteps)

    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        bb = self.backbone
        net = unet if unet is not None else self.generator_unet()
        return EvalModel(self.method, bb, self.consistency(bb.denoiser(net)),
                         "lcm", guidance_scale=self.export_guidance_scale,
                         guidance_embedding=self.w_dim, timesteps=self.lcm_timesteps)

    def export(self, out_dir: Path) -> Optional[Path]:
        from diffdistill.export import (
            flow_usage_code,
            save_generator,
            write_export_info,
            write_model_card,
        )

        p, bb = self.cfg.lcd, self.backbone
        out_dir = Path(out_dir)
        lora = self.cfg.adapter.type == "lora"
        sched_kwargs = ({} if p.num_ddim_timesteps == 50
                        else {"original_inference_steps": p.num_ddim_timesteps})
        unet = self.generator_unet()
        more = [1] if p.onestep_timestep is not None else []  # its own one-step start
        base_model = resolve_model_path(self.cfg.model.path)
        if self.flow:  # FlowMatchEuler with stochastic sampling at its sigmas
            sigmas = (self.lcm_timesteps(p.export_steps).double() / bb.schedule.t_max).tolist()
            save_generator(bb, unet, out_dir, lora=lora, scheduler="flow_stochastic")
            write_model_card(out_dir, prompt=self.card_prompt(), method=self.method,
                             base_model=base_model, steps=p.export_steps,
                             guidance_scale=self.export_guidance_scale,
                             scheduler="flow_stochastic", lora=lora, kind=bb.kind,
                             extra={"sigmas": sigmas, "w range": f"[{p.w_min}, {p.w_max}]"},
                             code=flow_usage_code(bb, model_id=str(out_dir),
                                                  base_model=base_model, lora=lora,
                                                  sigmas=sigmas, prompt=self.card_prompt()))
            write_export_info(out_dir, **self.eval_spec(unet).export_info(p.export_steps, more),
                              method=self.method)
            return out_dir
        save_generator(bb, unet, out_dir, lora=lora, scheduler="lcm",
                       scheduler_kwargs=sched_kwargs)
        gs = self.export_guidance_scale
        write_model_card(out_dir, prompt=self.card_prompt(),
                         method=self.method, base_model=resolve_model_path(
            self.cfg.model.path), steps=p.export_steps, guidance_scale=gs, scheduler="lcm",
            lora=lora, kind=bb.kind, scheduler_kwargs=sched_kwargs if lora else None,
            extra={"adapter": self.cfg.adapter.type, "w range": f"[{p.w_min}, {p.w_max}]",
                   "DDIM solver timesteps": p.num_ddim_timesteps,
                   "1-step timestep (pass timesteps=[t] for one step)":
                       int(self.lcm_timesteps(1)[0])})
        # guidance_embedding True: the UNet embeds w = guidance_scale − 1 (no CFG pass)
        write_export_info(out_dir, **self.eval_spec(unet).export_info(p.export_steps, more),
                          original_inference_steps=p.num_ddim_timesteps, method=self.method,
                          reward_networks=self.reward_networks())
        return out_dir

    def reward_networks(self) -> list[dict]:
        """The reward networks the student was trained against (none for plain LCD)."""
        return []


# ----------------------------------------------------------------------------- RG-LCD


class DirectReward:
    """R(decode(x0̂), prompt) with gradients through the VAE decoder (RG-LCD, direct RM)."""

    def __init__(self, trainer: "RGLCDTrainer"):
        self.trainer = trainer

    def student_reward(self, terms: LCDTerms) -> Tensor:
        images = self.trainer.backbone.decode_latents(terms.student_x0)
        return self.trainer.reward_model(images, terms.prompts)

    def update(self, terms: LCDTerms) -> dict:
        return {}


class LatentProxyReward:
    """RG-LCD's latent proxy RM: trained online on the expert's triplet preferences.

    Each step the LRM is fitted (its own optimizer, ``"lrm"``) to ``softmax(s · R)`` over
    {student x0̂, target x0̂, ground-truth latent} decoded and scored by the expert R
    (:func:`~diffdistill.rewards.lrm_preference_loss`); the student maximises the LRM's score
    of its latent x0̂ directly, with the LRM's weights frozen for that term.
    """

    def __init__(self, trainer: "RGLCDTrainer"):
        from diffdistill.rewards import LatentRewardModel

        c, bb = trainer.cfg.lrm, trainer.backbone
        self.trainer = trainer
        text_dim = bb.unet.config.cross_attention_dim if c.text else None
        lrm = LatentRewardModel(bb.latent_channels, c.width, c.depth, text_dim).to(trainer.device)
        self.lrm = trainer.add_optimizer("lrm", lrm, lr=c.lr)
        self.logit_scale = (c.expert_logit_scale if c.expert_logit_scale is not None
                            else trainer.reward_model.logit_scale)
        self.use_text = c.text
        self.pairwise = c.loss == "pairwise"

    def _text(self, terms: LCDTerms) -> Optional[Tensor]:
        return pooled_text(terms.cond) if self.use_text else None

    def student_reward(self, terms: LCDTerms) -> Tensor:
        lrm = self.trainer.unwrap(self.lrm)
        lrm.requires_grad_(False)  # the student's term must not leave gradients in the LRM
        try:
            return lrm(terms.student_x0, self._text(terms))
        finally:
            lrm.requires_grad_(True)

    def update(self, terms: LCDTerms) -> dict:
        from diffdistill.rewards import lrm_preference_loss

        tr = self.trainer
        n = terms.x0.shape[0]
        cands = torch.stack([terms.student_x0.detach().float(), terms.target_x0.float(),
                             terms.x0.float()], dim=1).flatten(0, 1)  # [3n]: per prompt
        prompts = [p for p in terms.prompts for _ in range(3)]
        with torch.no_grad():
            expert = tr.reward_model(tr.backbone.decode_latents(cands), prompts).view(n, 3)
        text = self._text(terms)
        scores = self.lrm(cands, None if text is None else text.repeat_interleave(3, dim=0))
        scores = scores.view(n, 3)
        loss = lrm_preference_loss(scores, expert, self.logit_scale,
                                   pairwise=self.pairwise).mean()
        tr.step("lrm", tr.cfg.lrm.loss_weight * loss)
        agree = (scores.detach().argmax(dim=1) == expert.argmax(dim=1)).float().mean()
        return {"loss_lrm": loss.detach(), "lrm_agreement": agree,
                "expert_reward_student": expert[:, 0].mean()}


REWARD_TERMS = {"direct": DirectReward, "lrm": LatentProxyReward}


class RGLCDTrainer(LCDTrainer):
    method = "rglcd"
    config_class = RGLCDConfig
    trains_flow_transformers = False  # the reward path is not wired for flow teachers

    def build(self) -> None:
        super().build()
        from .common import load_reward_from

        self.reward_model = load_reward_from(self.cfg.reward, "reward", self.device)
        self.reward_term = REWARD_TERMS[self.cfg.rglcd.mode](self)

    def reward_networks(self) -> list[dict]:
        from .common import reward_network_record

        return [reward_network_record(self.cfg.reward)]  # the LRM mode fits it too

    def train_step(self, batch: dict) -> dict[str, float]:
        terms = self.consistency_terms(batch)
        reward = self.reward_term.student_reward(terms)
        loss_lcd = terms.loss.mean()
        loss = loss_lcd - self.cfg.rglcd.beta * reward.mean()
        self.step("unet", loss)
        logs = {"loss": loss.detach(), "loss_lcd": loss_lcd.detach(),
                "reward": reward.detach().mean()}
        logs.update(self.reward_term.update(terms))
        return logs
