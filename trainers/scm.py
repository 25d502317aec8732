"""sCM — continuous-time consistency training (sCT) and distillation (sCD) in TrigFlow
(Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
ICLR 2025; the loss of Sec. 4, Eq. 8–10 and Alg. 1; the proposal of Sec. 4.3 / App. G).

Notation (:mod:`diffdistill.trigflow`): x_t̂ = cos(t̂)·x0 + sin(t̂)·z, z ~ N(0, σ_d² I); the
student F_θ(x_t̂/σ_d, t̂) is the folder's network seen through :class:`~diffdistill.trigflow.TrigFlow`
(the teacher's parameterisation converted once), its consistency function
f_θ = cos(t̂)·x_t̂ − sin(t̂)·σ_d·F_θ, which equals the network's own x0̂ at the native time.

One step (``scm.mode``: ``ct`` = sCT from data, no teacher; ``cd`` = sCD from model.path):

* t̂ from the proposal tan(t̂) = e^τ/σ_d, τ ~ N(P_mean, P_std²) (−1.0, 1.4 for CIFAR-10 sCT;
  sCD ImageNet-512 −0.8, 1.6), clamped to the teacher schedule's range
  (:func:`draw_t_hat`);
* dx_t̂/dt̂: sCT the pair's own velocity cos(t̂)·z − sin(t̂)·x0; sCD the teacher's
  classifier-free-guided PF-ODE velocity σ_d·F_teacher (guidance on x0̂, ``scm.guidance_scale``);
* F⁻ and cos(t̂)sin(t̂)·dF⁻/dt̂ by one JVP of F_θ⁻ = stopgrad F_θ with tangents
  (cos·sin·dx/dt̂, cos·sin) for the inputs (x_t̂, t̂), under no_grad
  (:func:`diffdistill.jvp.jvp`; ``scm.jvp=finite_difference`` for central differences);
* the tangent (Eq. 8 multiplied by cos t̂, with the tangent warm-up r of Sec. 4.2):

      g = −cos²(t̂)·(σ_d F⁻ − dx/dt̂) − r·cos(t̂)·sin(t̂)·(x_t̂ + σ_d dF⁻/dt̂),
      r = min(1, step / scm.tangent_warmup_steps)                           (:func:`scm_tangent`)

  normalised g ← g / (‖g‖ + c), c = 0.1 (Sec. 4.2 "tangent normalization"; ‖·‖ the per-sample
  L2 norm, or with ``scm.tangent_norm=rms`` the RMS, which does not grow with the image size);
* the loss with the adaptive weighting of Sec. 4.2 / Eq. 9 (a learned log-variance w(t̂),
  :class:`LogVarHead`) and the optional prior weight λ(t̂) = 1/(σ_d tan t̂):

      L = λ(t̂)·e^{−w(t̂)}/D·‖F_θ − F⁻ − g‖² + w(t̂)                         (:func:`scm_loss`)

  whose gradient in θ is that of the regression onto F⁻ + g. It is split into the
  network's term (w detached) and the head's term (the squared error detached), so that each
  of the two optimizers gets exactly its part of ∇L from its own backward.

The dropout mask of the θ⁻ JVP is the gradient pass's (a seed from the trainer's generator,
as iCT does): resume is bit-identical.

Sampling (Sec. 5; :meth:`SCMTrainer.eval_spec`): one step f(σ_d z, t̂_max); two steps re-noise
at t̂_mid = ``scm.two_step_t_hat`` (1.1 in the paper). Since f_θ is the network's x0̂ at the
native time, this is the toolkit's consistency sampler (``lcm``) on the native grid
[t_max, t(t̂_mid)] (rounded to an integer timestep).

Export (:meth:`SCMTrainer.export`): TrigFlow and the teacher's VP schedule are the same
family of marginals (x_t = x_t̂·α_t/cos t̂), and f_θ is the network's own x0̂ at the native
time, so the student is an ordinary pipeline folder (full) or LoRA sampled by the stock
``LCMScheduler`` at the native grid: [t_max] (``original_inference_steps=1``) or
[t_max, t(t̂_mid)] passed as ``timesteps=[…]``. LCMScheduler applies LCM's boundary condition
c_skip·x + c_out·x0̂ on top (c_skip = 0.25/((10t)² + 0.25)); at the default grid
(999 and 255 on the world's pixel teacher, 999 and 349 on its latent one) c_skip ≤ 4e-8,
so the stock pipeline reproduces the trainer's samples well inside the 1e-4 its tests check
(as DMD2's export does). The recorded
number of steps is ``scm.export_steps``; the card lists both grids.

Flow (SD3-class) teachers: the same conversion with α = 1 − σ, σ = t/T (native times in
[0, T], no shift); the export is the stock pipeline with ``FlowMatchEulerDiscreteScheduler``
(shift 1, stochastic sampling) called with ``sigmas`` = [1.0] / [1.0, t(t̂_mid)/T]
(:meth:`SCMTrainer._export_flow`). rCM (sCD + distribution matching) is
:mod:`diffdistill.trainers.rcm` (VP teachers only).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import nn

from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond
from diffdistill.jvp import JVP_METHODS, jvp
from diffdistill.trigflow import TrigFlow, native_time, trig_noise, trig_velocity

from .base import Trainer
from .common import BackboneMixin

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the math


def draw_t_hat(n: int, p_mean: float, p_std: float, sigma_data: float,
               generator: Optional[torch.Generator] = None,
               t_range: tuple[float, float] = (0.0, math.pi / 2)) -> Tensor:
    """t̂ = atan(e^τ / σ_d), τ ~ N(P_mean, P_std²), clamped to ``t_range`` (float64, CPU)."""
    tau = p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.atan(tau.exp() / sigma_data).clamp(*t_range)


def _b(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device, like.dtype)


def scm_tangent(f_minus: Tensor, df_minus: Tensor, x_hat: Tensor, dxdt: Tensor, t_hat: Tensor,
                r: float, sigma_data: float) -> Tensor:
    """g = −cos²(t̂)(σ_d F⁻ − dx/dt̂) − r·(cos(t̂) sin(t̂) x_t̂ + σ_d·df_minus), where
    ``df_minus`` is the JVP along (cos·sin·dx/dt̂, cos·sin), i.e. cos(t̂) sin(t̂)·dF⁻/dt̂
    (Lu & Song 2024, Eq. 8 times cos t̂, with the warm-up r)."""
    c, s = _b(torch.cos(t_hat), x_hat), _b(torch.sin(t_hat), x_hat)
    return -c * c * (sigma_data * f_minus - dxdt) - r * (c * s * x_hat + sigma_data * df_minus)


def normalize_tangent(g: Tensor, c: float = 0.1, kind: str = "l2") -> Tensor:
    """g / (‖g‖ + c) per sample; ``kind="rms"`` uses ‖g‖/√D (D = elements per sample)."""
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    elif kind != "l2":
        raise ValueError(f"tangent norm {kind!r} is unknown; use 'l2' or 'rms'")
    return g / _b(norm + c, g)


def scm_loss(f: Tensor, f_minus: Tensor, g: Tensor, logvar: Tensor,
             weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample λ·e^{−w}/D·‖F − F⁻ − g‖² + w as (value, network term, head term): the
    network term has w detached, the head term the squared error detached; their sum has the
    value and the gradient of the joint loss in both the network and the head."""
    dt = torch.promote_types(f.dtype, torch.float32)  # float32 at least
    mse = (f.to(dt) - f_minus.to(dt) - g.to(dt)).pow(2).flatten(1).mean(dim=1)
    lam = torch.ones_like(mse) if weight is None else weight.to(mse)
    w = logvar.reshape(-1).to(mse)
    value = lam * torch.exp(-w) * mse + w
    return value, lam * torch.exp(-w.detach()) * mse, lam * torch.exp(-w) * mse.detach() + w


class LogVarHead(nn.Module):
    """The adaptive weighting's log-variance w(t̂) (Lu & Song 2024, Sec. 4.2; EDM2's
    uncertainty weighting): a linear map of a sinusoidal embedding of t̂ (scaled to
    [0, 1000] over [0, π/2]), zero-initialised so that w = 0 at the start."""

    def __init__(self, dim: int = 64):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half),
                             persistent=False)
        self.linear = nn.Linear(2 * half, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t_hat: Tensor) -> Tensor:
        s = (t_hat.float() * (2000.0 / math.pi)).reshape(-1, 1) * self.freqs.reshape(1, -1)
        return self.linear(torch.cat([torch.cos(s), torch.sin(s)], dim=1)).reshape(-1)


# ----------------------------------------------------------------------------- config


@dataclass
class SCMSection:
    mode: Literal["ct", "cd"] = "ct"  # ct: sCT from data alone; cd: sCD from model.path
    teacher: Optional[str] = None  # cd: the teacher folder (None: model.path, the only one yet)
    init: Literal["scratch", "pretrained"] = "pretrained"  # the student's start
    # scratch only: the student's parameterisation (None: the folder's); v_prediction keeps
    # x0̂ = α x − σ v̂ bounded at t̂ → π/2 where ε-prediction divides by α
    student_prediction: Optional[Literal["epsilon", "v_prediction", "sample"]] = None
    sigma_data: float = 0.5  # σ_d (pixels; latents: their own std)
    p_mean: float = -1.0  # proposal τ ~ N(P_mean, P_std²), tan t̂ = e^τ/σ_d (CIFAR-10 sCT)
    p_std: float = 1.4
    tangent_warmup_steps: int = 10000  # r: 0 → 1 linearly over these steps (0: r = 1)
    tangent_norm_c: float = 0.1  # g / (‖g‖ + c)
    tangent_norm: Literal["l2", "rms"] = "l2"
    prior_weighting: bool = False  # λ(t̂) = 1/(σ_d tan t̂)
    guidance_scale: float = 1.0  # cd: the teacher's CFG scale in dx/dt̂
    jvp: str = "autograd"  # autograd (forward-mode AD) | finite_difference
    jvp_fd_eps: float = 1e-3  # finite_difference: step along the tangent (cos·sin·ẋ, cos·sin)
    logvar_dim: int = 64  # the weight head's embedding width
    two_step_t_hat: float = 1.1  # the 2-step sampler's middle time (the paper's)
    export_steps: int = 2  # the steps the export's card and record use (1 or 2; both listed)


@dataclass
class SCMConfig(BaseConfig):
    scm: SCMSection = field(default_factory=SCMSection)

    def validate(self) -> None:
        super().validate()
        c = self.scm
        if c.mode == "ct" and c.teacher is not None:
            raise ConfigError("scm.teacher: sCT (scm.mode=ct) trains from data alone; remove "
                              "scm.teacher or set scm.mode=cd")
        if c.mode == "ct" and c.guidance_scale != 1.0:
            raise ConfigError(f"scm.guidance_scale={c.guidance_scale}: sCT (scm.mode=ct) has no "
                              "teacher to guide; set it to 1 or use scm.mode=cd")
        if c.mode == "cd" and c.teacher is not None and c.teacher != self.model.path:
            raise ConfigError("scm.teacher: sCD starts the student from its teacher, "
                              "model.path; a separate teacher folder is not supported yet "
                              "(leave scm.teacher null)")
        if c.mode == "cd" and c.init == "scratch":
            raise ConfigError("scm.init=scratch with scm.mode=cd: sCD starts the student from "
                              "the teacher (scm.init=pretrained)")
        if c.student_prediction is not None and c.init != "scratch":
            raise ConfigError("scm.student_prediction changes what the network's output means,"
                              " which only a scratch student can: set scm.init=scratch or "
                              "leave it null")
        if self.adapter.type == "lora" and c.init == "scratch":
            raise ConfigError("adapter.type=lora freezes the base weights, which scm.init="
                              "scratch re-initialises at random: use adapter.type=full")
        if c.sigma_data <= 0:
            raise ConfigError(f"scm.sigma_data must be > 0, got {c.sigma_data}")
        if c.p_std <= 0:
            raise ConfigError(f"scm.p_std must be > 0, got {c.p_std}")
        if c.tangent_warmup_steps < 0:
            raise ConfigError(f"scm.tangent_warmup_steps must be >= 0, got "
                              f"{c.tangent_warmup_steps}")
        if c.tangent_norm_c <= 0:
            raise ConfigError(f"scm.tangent_norm_c must be > 0, got {c.tangent_norm_c}")
        if c.guidance_scale < 1.0:
            raise ConfigError(f"scm.guidance_scale must be >= 1, got {c.guidance_scale}")
        if c.jvp not in JVP_METHODS:
            raise ConfigError(f"scm.jvp={c.jvp!r} is unknown; use one of "
                              f"{', '.join(JVP_METHODS)}")
        if c.jvp_fd_eps <= 0:
            raise ConfigError(f"scm.jvp_fd_eps must be > 0, got {c.jvp_fd_eps}")
        if c.logvar_dim < 2:
            raise ConfigError(f"scm.logvar_dim must be >= 2, got {c.logvar_dim}")
        if not 0 < c.two_step_t_hat < math.pi / 2:
            raise ConfigError(f"scm.two_step_t_hat must lie in (0, π/2), got "
                              f"{c.two_step_t_hat}")
        if c.export_steps not in (1, 2):
            raise ConfigError(f"scm.export_steps must be 1 or 2 (the trained samplers), got "
                              f"{c.export_steps}")
        if self.data.kind == "prompts":
            raise ConfigError("data.kind='prompts': sCT and sCD noise data samples x0 (x_t̂ = "
                              "cos t̂·x0 + sin t̂·z), which a prompts-only dataset has none of; "
                              "use an image dataset")
        if self.train.compile:
            raise ConfigError(f"train.compile=true with method {self.method or 'scm'}: the θ⁻ JVP "
                              "(torch.func.jvp) through a compiled network has not run in this "
                              "toolkit yet; set train.compile=false")


# ----------------------------------------------------------------------------- trainer


class SCMTrainer(BackboneMixin, Trainer):
    method = "scm"
    config_class = SCMConfig
    trains_flow_transformers = True  # SD3-class flow teachers: sCD through the MMDiT's JVP
    resume_must_match = Trainer.resume_must_match + (
        "scm.mode", "scm.init", "scm.student_prediction", "scm.sigma_data", "scm.logvar_dim")

    def build(self) -> None:
        cfg, c = self.cfg, self.cfg.scm
        bb = self.load_backbone()
        from diffdistill.adapters import (
            adapters_disabled,
            clone_unet,
            make_trainable,
            set_attention_backend,
        )

        self.teacher_tf: Optional[TrigFlow] = None
        self.teacher_context: Callable = _nothing
        pred = c.student_prediction or bb.prediction_type
        self.before_student(bb)
        if cfg.adapter.type == "lora":  # a LoRA on the folder's UNet; the teacher runs without it
            make_trainable(bb.unet, **self.adapter_kwargs(frozen_dtype=self.frozen_dtype))
            unet = bb.unet
        else:
            unet = self._scratch(bb.unet) if c.init == "scratch" else clone_unet(bb.unet)
            set_attention_backend(unet, cfg.model.attention)
            make_trainable(unet, **self.adapter_kwargs())
            bb.unet.requires_grad_(False).to(self.frozen_dtype)
        self.backbone = dataclasses.replace(bb, unet=unet, prediction_type=pred)
        self.unet = self.add_optimizer("unet", unet)
        self.add_eval_ema("unet", self.unet)
        self.logvar = self.add_optimizer("logvar", LogVarHead(c.logvar_dim).to(self.device))
        den = self.backbone.denoiser
        self.student_tf = TrigFlow(den(self.unet), c.sigma_data)
        self.target_tf = TrigFlow(den(self.side_pass(self.unet)), c.sigma_data)  # θ⁻, no grad
        if c.mode == "cd":
            raw = self.unwrap(self.unet)
            if cfg.adapter.type == "lora":
                self.teacher_tf = TrigFlow(bb.denoiser(raw), c.sigma_data)
                self.teacher_context = lambda: adapters_disabled(raw)
            else:
                self.teacher_tf = TrigFlow(bb.denoiser(), c.sigma_data)
        self.t_range = (self.student_tf.t_hat_min, self.student_tf.t_hat_max)

    def before_student(self, bb) -> None:
        """Hook: runs on the loaded backbone before the student is made trainable (rCM copies
        the teacher's structure for its fake score here, before a student LoRA exists)."""

    def fsdp_unsupported(self) -> Optional[str]:
        return ("the θ⁻ JVP (torch.func.jvp) through an FSDP-sharded network has not run in "
                "this toolkit yet; use configs/accelerate/multi_gpu.yaml (DDP)")

    def _scratch(self, unet: nn.Module) -> nn.Module:
        """The folder's architecture, re-initialised with a seeded init (independent of what
        drew from the global RNG before)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            new = type(unet).from_config(unet.config)
        return new.to(self.device, torch.float32)

    # -- the pieces of one step (public so that tests can check each) -----------------
    def tangent_warmup(self, step: Optional[int] = None) -> float:
        """r = min(1, step / scm.tangent_warmup_steps) (1 without warm-up)."""
        k = self.cfg.scm.tangent_warmup_steps
        step = self.global_step if step is None else step
        return 1.0 if k == 0 else min(1.0, step / k)

    def draw_t_hat(self, n: int) -> Tensor:
        c = self.cfg.scm
        return draw_t_hat(n, c.p_mean, c.p_std, c.sigma_data, self.generator, self.t_range)

    def velocity(self, x0: Tensor, z: Tensor, x_hat: Tensor, t_hat: Tensor, cond) -> Tensor:
        """dx_t̂/dt̂: the data's (sCT) or the guided teacher's (sCD)."""
        if self.teacher_tf is None:
            return trig_velocity(x0, z, t_hat)
        with torch.no_grad(), self.teacher_context():
            return self.teacher_tf.velocity(x_hat, t_hat, cond,
                                            self.cfg.scm.guidance_scale).float()

    def tangent_terms(self, x_hat: Tensor, t_hat: Tensor, dxdt: Tensor, cond, seed: int,
                      step: Optional[int] = None, extra: Optional[tuple[Tensor, Tensor]] = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(F_θ with gradient, F⁻, normalised g): the student pass and the θ⁻ JVP, both
        starting from the RNG seed ``seed`` (one dropout mask). ``extra`` = (x̂', t̂'): more
        inputs for the same student forward (rCM's generator sample), whose F rows follow
        the batch's in the returned F (one forward, so one DDP reduction per update)."""
        c = self.cfg.scm
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if extra is None:
                f = self.student_tf(x_hat, t_hat, cond)
            else:
                both = None if cond is None else Cond.cat([cond, cond])
                f = self.student_tf(torch.cat([x_hat, extra[0].to(x_hat.dtype)]),
                                    torch.cat([t_hat, extra[1].to(t_hat)]), both)
        cs = torch.cos(t_hat) * torch.sin(t_hat)
        tangents = (_b(cs, x_hat) * dxdt.to(x_hat.dtype), cs)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            f_minus, df_minus = jvp(lambda x, t: self.target_tf(x, t, cond), (x_hat, t_hat),
                                    tangents, method=c.jvp, fd_eps=c.jvp_fd_eps)
        g = scm_tangent(f_minus.double(), df_minus.double(), x_hat.double(), dxdt.double(),
                        t_hat, self.tangent_warmup(step), c.sigma_data)
        g = normalize_tangent(g, c.tangent_norm_c, c.tangent_norm)
        return f, f_minus.detach(), g.to(f.dtype)

    def loss_terms(self, batch: dict, extra: Optional[Callable] = None) -> dict[str, Tensor]:
        """One batch's loss (value, the network's and the head's terms) and its pieces.
        ``extra(cond) -> (x̂', t̂')``, called after this batch's random draws: inputs that
        share the student's forward (:meth:`tangent_terms`); their F is ``f_extra``."""
        c = self.cfg.scm
        x0 = self.encode_x0(batch).float()
        guided = self.teacher_tf is not None and c.guidance_scale != 1.0
        cond = self.cond_for_batch(batch, with_uncond=guided)
        student_cond = cond.replace(uncond=None) if cond is not None else None
        n = x0.shape[0]
        t_hat = self.draw_t_hat(n).to(self.device)
        z = c.sigma_data * self.randn(*x0.shape)
        x_hat = trig_noise(x0, z, t_hat)
        dxdt = self.velocity(x0, z, x_hat, t_hat, cond)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        ext = extra(student_cond) if extra is not None else None
        f, f_minus, g = self.tangent_terms(x_hat, t_hat, dxdt, student_cond, seed, extra=ext)
        f, f_extra = f[:n], (f[n:] if ext is not None else None)
        weight = (1.0 / (c.sigma_data * torch.tan(t_hat))) if c.prior_weighting else None
        logvar = self.logvar(t_hat)
        value, net_term, head_term = scm_loss(f, f_minus, g, logvar, weight)
        return {"loss": value.mean(), "loss_net": net_term.mean(), "loss_head": head_term.mean(),
                "logvar": logvar.detach().mean(), "t_hat": t_hat.mean(),
                "g_rms": g.detach().pow(2).mean().sqrt(), "g": g.detach(),
                "f_minus": f_minus, "f_extra": f_extra}

    def train_step(self, batch: dict) -> dict[str, float]:
        terms = self.loss_terms(batch)
        self.step("unet", terms["loss_net"])
        self.step("logvar", terms["loss_head"])
        return {"loss": terms["loss"].detach(), "logvar": terms["logvar"],
                "tangent_warmup": self.tangent_warmup(), "g_rms": terms["g_rms"]}

    # -- sampling -----------------------------------------------------------------------
    def generator_unet(self) -> nn.Module:
        return self.ema_or_online("unet", self.unet)

    def sample_timesteps(self, steps: int) -> Optional[Tensor]:
        """Native grid of the 1- and 2-step samplers: [t_max] and [t_max, t(t̂_mid)]
        (None for other step counts: the sampler's default grid)."""
        sched = self.backbone.schedule
        if steps == 1:
            return torch.tensor([sched.t_max], dtype=torch.float64)
        if steps == 2:
            mid = native_time(sched, torch.tensor([self.cfg.scm.two_step_t_hat]),
                              self.cfg.scm.sigma_data)
            mid = mid.round()  # an integer timestep (VP table; flow: σ on a 1/T grid)
            return torch.cat([torch.tensor([sched.t_max], dtype=torch.float64), mid])
        return None

    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        bb = self.backbone
        net = unet if unet is not None else self.generator_unet()
        return EvalModel(self.method, bb, bb.denoiser(net), "lcm",
                         timesteps=self.sample_timesteps,
                         sampler_opts={"clip_denoised": bb.kind == "pixel"})

    def grid_step_counts(self) -> list[int]:
        return [1, 2]

    def _export_flow(self, out):
        """A flow (SD3-class) student: its teacher's stock pipeline with
        ``FlowMatchEulerDiscreteScheduler`` at shift 1 with stochastic sampling (x0̂ = x − σ v̂,
        re-noised along the flow path: the trainer's sampler), called with the native grid
        as ``sigmas`` = t / T (as DMD2's flow export). The stock SD3 pipeline does not pass its
        generator to the scheduler's step, so the 2-step re-noising draws from the global RNG:
        given the same noise the step is the trainer's (tested), seeded per sample it is not."""
        from diffdistill.export import (
            flow_usage_code,
            save_generator,
            write_export_info,
            write_model_card,
        )
        from diffdistill.world import resolve_model_path

        bb, c = self.backbone, self.cfg.scm
        T = bb.schedule.num_train_timesteps
        lora = self.cfg.adapter.type == "lora"
        grids = {n: [float(t) / T for t in self.sample_timesteps(n).tolist()] for n in (1, 2)}
        unet, base_model = self.generator_unet(), resolve_model_path(self.cfg.model.path)
        save_generator(bb, unet, out, lora=lora, scheduler="flow_stochastic",
                       adapter_name="default")
        write_export_info(out, **self.eval_spec(unet).export_info(c.export_steps, (1, 2)),
                          method=self.method)
        code = flow_usage_code(bb, model_id=str(out), base_model=base_model, lora=lora,
                               sigmas=grids[c.export_steps], prompt=self.card_prompt())
        write_model_card(out, prompt=self.card_prompt(), method=self.method,
                         base_model=base_model, steps=c.export_steps, guidance_scale=1.0,
                         scheduler="flow_stochastic", lora=lora, kind=bb.kind,
                         extra={"1-step sigmas": grids[1], "2-step sigmas": f"{grids[2]} "
                                f"(t̂ = {c.two_step_t_hat} in TrigFlow)"}, code=code)
        return out

    @torch.no_grad()
    def sample_latents(self, seeds: list[int], cond, steps: int) -> Tensor:
        """The trainer's own ``steps``-step sampler on the generator (latents / pixels,
        float32): what an export must reproduce."""
        from diffdistill.backbone import grid_shape
        from diffdistill.sampling import generate

        spec = self.eval_spec()
        return generate(spec.denoiser, seeds=seeds,
                        shape=grid_shape(self.backbone, self.cfg.data.resolution),
                        cond_fn=lambda sl: cond.index(sl) if cond is not None else None,
                        sampler="lcm", timesteps=self.sample_timesteps(steps),
                        sampler_opts=spec.sampler_opts, output="latents", progress=False)

    def export(self, out_dir):
        """The student as its teacher's stock pipeline folder (full; pixel LoRA students are
        merged) or a diffusers + kohya LoRA, sampled by ``LCMScheduler`` at the native grid of
        :meth:`sample_timesteps` (module docstring: why the boundary condition it applies is
        negligible there). A pixel class-conditional student gets a scheduler loop in its card
        (no stock pipeline passes class labels)."""
        from pathlib import Path

        from diffdistill.backbone import grid_shape
        from diffdistill.denoiser import lcm_boundary
        from diffdistill.export import save_generator, write_export_info, write_model_card
        from diffdistill.world import resolve_model_path

        from .dmd2 import lcm_original_steps, pixel_usage_code

        bb, c, out = self.backbone, self.cfg.scm, Path(out_dir)
        if bb.schedule.kind == "flow":
            return self._export_flow(out)
        if bb.schedule.kind != "vp":
            return None
        steps = c.export_steps
        grids = {n: [int(t) for t in self.sample_timesteps(n).tolist()] for n in (1, 2)}
        T = bb.schedule.num_train_timesteps
        ts = grids[steps]
        ois = lcm_original_steps(ts, T)
        sched_kwargs: dict = {"original_inference_steps": ois} if ois is not None else {}
        lora = self.cfg.adapter.type == "lora" and bb.kind != "pixel"
        if bb.kind == "pixel":  # the trainer's pixel sampler clips x0̂ to [-1, 1]
            sched_kwargs["clip_sample"] = True
        if c.student_prediction and c.student_prediction != bb.scheduler_config.get(
                "prediction_type", "epsilon"):
            sched_kwargs["prediction_type"] = c.student_prediction
        call_kwargs = {} if ois is not None else {"timesteps": ts}
        all_ts = sorted({t for g in grids.values() for t in g})
        c_skip, c_out = lcm_boundary(torch.tensor(all_ts, dtype=torch.float64))
        extra = {"training": f"sCM ({'sCD, teacher CFG ' + str(c.guidance_scale) if c.mode == 'cd' else 'sCT'})"
                 f", TrigFlow σ_d = {c.sigma_data}",
                 "1-step timesteps": grids[1], "2-step timesteps": f"{grids[2]} "
                 f"(t̂ = {c.two_step_t_hat} in TrigFlow)",
                 "note": f"f_θ is the network's own x0̂ at the native time; the stock "
                         f"LCMScheduler's boundary condition is negligible at these timesteps "
                         f"(c_skip <= {float(c_skip.max()):.1e}, |1 - c_out| <= "
                         f"{float((1 - c_out).abs().max()):.1e})"}
        unet = self.generator_unet()
        save_generator(bb, unet, out, lora=lora, scheduler="lcm", scheduler_kwargs=sched_kwargs,
                       adapter_name="default")
        write_export_info(out, **self.eval_spec(unet).export_info(steps, (1, 2)),
                          method=self.method)
        base_model = resolve_model_path(self.cfg.model.path)
        code = None
        if bb.kind == "pixel":
            extra["sampling"] = ("class-conditional UNet2DModel + LCMScheduler; no stock "
                                 "pipeline passes class labels, so step the scheduler by hand "
                                 "as above")
            code = pixel_usage_code(str(out), ts, ois, grid_shape(bb, self.cfg.data.resolution))
        write_model_card(out, prompt=self.card_prompt(), method=self.method,
                         base_model=base_model, steps=steps, guidance_scale=1.0,
                         scheduler="lcm", lora=lora, kind=bb.kind,
                         scheduler_kwargs=sched_kwargs if lora else None,
                         call_kwargs=call_kwargs, extra=extra, code=code)
        return out


def _nothing():
    import contextlib

    return contextlib.nullcontext()


__all__ = ["LogVarHead", "SCMConfig", "SCMSection", "SCMTrainer", "draw_t_hat",
           "normalize_tangent", "scm_loss", "scm_tangent"]
