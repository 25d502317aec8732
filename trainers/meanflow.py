"""MeanFlow — one-step flow maps, from data or from a teacher (Geng et al. 2025, "Mean Flows
for One-step Generative Modeling", Alg. 1; equation numbers are the paper's).

The student u_θ(z, r, t | c) is the folder's network with a second time input Δ = t − r
(:mod:`diffdistill.flowmap`: the stock ``time_cond_proj_dim`` path of ``UNet2DConditionModel``,
:class:`~diffdistill.flowmap.TwoTimeUNet2D` around a ``UNet2DModel``, the widened pooled-text
input of an ``SD3Transformer2DModel``), zero-initialised so
that a pretrained student starts as its teacher: u_θ(z, t, t) = v_teacher(z, t). All MeanFlow
arithmetic happens in the flow frame z_t = (1 − t)·x + t·ε (the native time and input scale
of a VP teacher are derived from t, :class:`~diffdistill.flowmap.FlowMap`).

One step:

* (t, r): two draws of the logit-normal proposal t = sigmoid(n), n ~ N(P_mean, P_std²)
  (−0.4, 1.0 in the paper's ImageNet runs), sorted so t ≥ r; each sample keeps r ≠ t with
  probability ``meanflow.r_neq_t_ratio`` (25 % in the paper's ImageNet runs), else r = t (plain
  flow matching). t is clamped to the flow times the schedule covers (a VP table stops short
  of t = 1), r ≤ t;
* the velocity v (``meanflow.source``):
  ``data`` — the conditional velocity v = ε − x, and with ``guidance_scale`` ω ≠ 1 the
  guided target of Eq. 19, ṽ = ω·v + (1 − ω)·u_θ(z_t, t, t | ∅) (sg) for the samples that keep
  their condition, plain v for the ``cond_dropout`` share whose condition is dropped to ∅
  (10 % in the paper);
  ``teacher`` — the teacher's classifier-free-guided velocity ε̂ − x0̂ at (z_t, t) with scale
  ω (ε / v / x0 / flow teachers all through :class:`~diffdistill.denoiser.Denoiser`);
* du/dt = v·∂_z u_θ + ∂_t u_θ: one JVP of u_θ with tangents (v, 0, 1) over (z, r, t) (Eq. 8),
  without gradient (:func:`diffdistill.jvp.jvp`, autograd or central differences);
* u_tgt = v − (t − r)·du/dt (Eq. 10), and the adaptively weighted loss (its "loss metrics")

      L = w·‖u_θ(z_t, r, t) − sg(u_tgt)‖²,     w = sg(1/(‖Δ‖² + c)^p),  p = 1, c = 1e-3.

At r = t the target is v: the loss reduces to flow matching exactly. The JVP pass and the
gradient pass start from one RNG seed (one dropout mask), drawn from the trainer's generator:
resume is bit-identical.

Sampling (:func:`diffdistill.sampling.sample_meanflow`): one step x = z − t·u(z, 0, t)
from the schedule's t_max (z = ε on a flow; a VP teacher's x_T = ε, as its own samplers
start), two steps through the flow time ``meanflow.two_step_t`` (0.5).

Not here yet: LoRA students, Flux transformers, the flow-map loss as a term inside the
distribution-matching trainers (its pieces — :class:`~diffdistill.flowmap.FlowMap`,
:func:`~diffdistill.flowmap.meanflow_target`, :func:`~diffdistill.flowmap.meanflow_loss` — are
shared), the paper's CFG refinements (a guidance interval in t, mixing in the conditional u).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from diffdistill.config import BaseConfig, ConfigError
from diffdistill.denoiser import Cond
from diffdistill.flowmap import (
    TWO_TIME_FILE,
    FlowMap,
    TwoTimeUNet2D,
    add_second_time,
    default_delta_dim,
    meanflow_loss,
    meanflow_target,
    native_time,
)
from diffdistill.jvp import JVP_METHODS, jvp

from .base import Trainer
from .common import BackboneMixin

Tensor = torch.Tensor

#: the from-scratch student's schedule: a rectified flow read at 1000·t (u predicted directly)
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "shift": 1.0}


def draw_t_r(n: int, p_mean: float, p_std: float, r_neq_t_ratio: float,
             generator: Optional[torch.Generator] = None,
             t_range: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """(t, r), float64 on the CPU: two logit-normal draws sorted so t ≥ r; a sample keeps
    r ≠ t with probability ``r_neq_t_ratio`` (else r = t); t clamped to ``t_range``, r ≤ t."""
    a = torch.sigmoid(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64))
    b = torch.sigmoid(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64))
    keep = torch.rand(n, generator=generator, dtype=torch.float64) < r_neq_t_ratio
    t = torch.maximum(a, b).clamp(*t_range)
    r = torch.where(keep, torch.minimum(a, b), t)
    return t, torch.minimum(r, t)


def _where(mask: Tensor, a, b):
    """Per sample: ``a`` where ``mask`` else ``b`` (tensors, dicts of tensors or None)."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: _where(mask, a[k], b[k]) for k in a}
    m = mask.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1))
    return torch.where(m, a, b)


def mix_cond(cond: Cond, drop: Tensor) -> Cond:
    """``cond`` with the samples of ``drop`` replaced by ``cond.uncond`` (∅)."""
    u = cond.uncond
    return Cond(**{name: _where(~drop, getattr(cond, name), getattr(u, name)) for name in
                   ("encoder_hidden_states", "added_cond_kwargs", "class_labels",
                    "timestep_cond", "pooled_projections", "guidance")})


def _b(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device, like.dtype)


# ----------------------------------------------------------------------------- config


@dataclass
class MeanFlowSection:
    source: Literal["data", "teacher"] = "data"  # v: the data's conditional velocity | the teacher's
    init: Literal["scratch", "pretrained"] = "pretrained"  # scratch: pixel models, a flow student
    p_mean: float = -0.4  # logit-normal proposal of t and r (paper: ImageNet)
    p_std: float = 1.0
    r_neq_t_ratio: float = 0.25  # share of the batch with r ≠ t (the rest: flow matching)
    guidance_scale: float = 1.0  # ω: data: Eq. 19's guided target; teacher: its CFG scale
    cond_dropout: float = 0.1  # data with ω ≠ 1: share of samples trained unconditionally
    adaptive_p: float = 1.0  # w = 1/(‖Δ‖² + c)^p (0: plain L2)
    adaptive_c: float = 1.0e-3
    jvp: str = "autograd"  # autograd (forward-mode AD) | finite_difference
    # finite_difference: step along (v, 0, 1); diffusers embed 1000·t, whose fastest sinusoid
    # turns 1 rad per 1e-3 of t: 1e-3 was 11 % off the forward-mode JVP, 1e-4 0.1 % (tested)
    jvp_fd_eps: float = 1.0e-4
    delta_embedding_dim: Optional[int] = None  # Δ-embedding width (None: the time projection's)
    two_step_t: float = 0.5  # the 2-NFE sampler's intermediate flow time


@dataclass
class MeanFlowConfig(BaseConfig):
    meanflow: MeanFlowSection = field(default_factory=MeanFlowSection)

    def validate(self) -> None:
        super().validate()
        c = self.meanflow
        if c.source == "teacher" and c.init == "scratch":
            raise ConfigError("meanflow.init=scratch with meanflow.source=teacher: a distilled "
                              "student starts from its teacher (meanflow.init=pretrained)")
        if self.adapter.type != "full":
            raise ConfigError(f"adapter.type={self.adapter.type}: meanflow trains full weights "
                              "(the second time's embedding is new); set adapter.type=full")
        if not 0 <= c.r_neq_t_ratio <= 1:
            raise ConfigError(f"meanflow.r_neq_t_ratio must lie in [0, 1], got {c.r_neq_t_ratio}")
        if c.p_std <= 0:
            raise ConfigError(f"meanflow.p_std must be > 0, got {c.p_std}")
        if c.guidance_scale < 1.0:
            raise ConfigError(f"meanflow.guidance_scale must be >= 1, got {c.guidance_scale}")
        if not 0 <= c.cond_dropout < 1:
            raise ConfigError(f"meanflow.cond_dropout must lie in [0, 1), got {c.cond_dropout}")
        if c.source == "data" and c.guidance_scale != 1.0 and c.cond_dropout == 0:
            raise ConfigError("meanflow.guidance_scale != 1 with meanflow.source=data needs "
                              "meanflow.cond_dropout > 0 (Eq. 19 queries u(z, t, t | ∅), which "
                              "only dropped-condition samples train)")
        if c.adaptive_p < 0 or c.adaptive_c <= 0:
            raise ConfigError(f"meanflow.adaptive_p must be >= 0 and meanflow.adaptive_c > 0, "
                              f"got {c.adaptive_p}, {c.adaptive_c}")
        if c.jvp not in JVP_METHODS:
            raise ConfigError(f"meanflow.jvp={c.jvp!r} is unknown; use one of "
                              f"{', '.join(JVP_METHODS)}")
        if c.jvp_fd_eps <= 0:
            raise ConfigError(f"meanflow.jvp_fd_eps must be > 0, got {c.jvp_fd_eps}")
        if c.delta_embedding_dim is not None and c.delta_embedding_dim < 2:
            raise ConfigError(f"meanflow.delta_embedding_dim must be >= 2, got "
                              f"{c.delta_embedding_dim}")
        if not 0 < c.two_step_t < 1:
            raise ConfigError(f"meanflow.two_step_t must lie in (0, 1), got {c.two_step_t}")
        if self.train.compile:
            raise ConfigError("train.compile=true with method meanflow: the JVP "
                              "(torch.func.jvp) through a compiled network has not run in this "
                              "toolkit yet; set train.compile=false")


# ----------------------------------------------------------------------------- trainer


class MeanFlowTrainer(BackboneMixin, Trainer):
    method = "meanflow"
    config_class = MeanFlowConfig
    trains_flow_transformers = True  # SD3-class (Flux is refused in build)
    resume_must_match = Trainer.resume_must_match + (
        "meanflow.source", "meanflow.init", "meanflow.delta_embedding_dim")

    def build(self) -> None:
        cfg, c = self.cfg, self.cfg.meanflow
        bb = self.load_backbone()
        from diffdistill.adapters import clone_unet, make_trainable, set_attention_backend

        if bb.kind == "flux":
            raise ConfigError(f"model.path={cfg.model.path!r} holds a Flux transformer: meanflow "
                              "trains UNets and SD3-class transformers (Flux not yet)")
        if c.guidance_scale != 1.0 and bb.kind == "pixel" and bb.null_class is None:
            raise ConfigError(f"meanflow.guidance_scale={c.guidance_scale} needs an unconditional "
                              f"branch, which model.path's UNet lacks (no class labels or no "
                              "null-class embedding): set meanflow.guidance_scale=1")
        if c.init == "scratch" and bb.kind != "pixel":
            raise ConfigError(f"meanflow.init=scratch trains pixel models only (model.path holds"
                              f" a {bb.kind!r} model; its export has no stock route yet): use "
                              "meanflow.init=pretrained")
        self.teacher: Optional[FlowMap] = None
        if c.init == "scratch":
            with torch.random.fork_rng(devices=[]):  # a seeded init, whatever drew before
                torch.manual_seed(cfg.seed)
                net = type(bb.unet).from_config(bb.unet.config)
            net = net.to(self.device, torch.float32)
        else:
            net = clone_unet(bb.unet)
        self.delta_dim = int(c.delta_embedding_dim or default_delta_dim(net))
        try:
            net = add_second_time(net, self.delta_dim)
        except ValueError as e:
            raise ConfigError(f"model.path={cfg.model.path!r}: {e}") from None
        set_attention_backend(net.unet if isinstance(net, TwoTimeUNet2D) else net,
                              cfg.model.attention)
        make_trainable(net, **self.adapter_kwargs(gradient_checkpointing=False))
        if cfg.model.gradient_checkpointing:
            inner = net.unet if isinstance(net, TwoTimeUNet2D) else net
            inner.enable_gradient_checkpointing()
        if c.source == "teacher":
            bb.unet.requires_grad_(False).to(self.frozen_dtype)
            self.teacher_denoiser = bb.denoiser()
        else:
            bb.unet = None  # the folder's network is not needed (the student is a copy)
        view = {"unet": net}
        if c.init == "scratch":
            from diffdistill.schedule import FlowSchedule

            view.update(schedule=FlowSchedule(1000, FLOW_SCHEDULER), prediction_type="flow",
                        scheduler_config=dict(FLOW_SCHEDULER))
        self.backbone = dataclasses.replace(bb, **view)
        self.unet = self.add_optimizer("unet", net)
        self.add_eval_ema("unet", self.unet)
        den = self.backbone.denoiser
        self.student = FlowMap(den(self.unet), self.delta_dim)
        # same weights, no DDP reduction
        self.side = FlowMap(den(self.side_pass(self.unet)), self.delta_dim)
        self.t_range = (self.student.t_lo, self.student.t_hi)

    def fsdp_unsupported(self) -> Optional[str]:
        return ("the JVP (torch.func.jvp) through an FSDP-sharded network has not run in this "
                "toolkit yet; use configs/accelerate/multi_gpu.yaml (DDP)")

    # -- the pieces of one step (public so that tests can check each) -----------------
    def draw_t_r(self, n: int) -> tuple[Tensor, Tensor]:
        c = self.cfg.meanflow
        return draw_t_r(n, c.p_mean, c.p_std, c.r_neq_t_ratio, self.generator, self.t_range)

    def conditions(self, batch: dict) -> tuple[Optional[Cond], Optional[Tensor]]:
        """(the student's condition, the mask of samples dropped to ∅ or None): data with
        ω ≠ 1 drops ``cond_dropout`` of the batch and keeps ``uncond`` for Eq. 19; the teacher
        source keeps ``uncond`` for the teacher's CFG."""
        c = self.cfg.meanflow
        n = len(batch["caption"]) if "caption" in batch else len(batch["class_label"])
        if self.backbone.kind == "pixel" and self.backbone.num_classes is None:
            return None, None
        guided = c.guidance_scale != 1.0
        cond = self.cond_for_batch(batch, with_uncond=guided)
        if c.source == "data" and guided:
            drop = (self.rand(n) < c.cond_dropout).cpu()
            return mix_cond(cond, drop).replace(uncond=cond.uncond), drop
        return cond, None

    def velocity(self, x0: Tensor, eps: Tensor, z: Tensor, t: Tensor, cond: Optional[Cond],
                 drop: Optional[Tensor]) -> Tensor:
        """v (flow frame, float32): the data's (with Eq. 19's guidance) or the teacher's."""
        c = self.cfg.meanflow
        if c.source == "teacher":
            x, tau = self.student.to_native(z, t)
            with torch.no_grad():
                pred = self.teacher_denoiser.guided(x.to(self.frozen_dtype), tau, cond,
                                                    c.guidance_scale)
            return (pred.eps - pred.x0).float()
        v = eps - x0
        if drop is None:
            return v
        with torch.no_grad():  # ṽ = ω v + (1 − ω) u_θ(z, t, t | ∅)  (Eq. 19, sg)
            v_null = self.side.average_velocity(z, t, t, cond.uncond).float()
        guided = c.guidance_scale * v + (1.0 - c.guidance_scale) * v_null
        return torch.where(_b(~drop, v).bool(), guided, v)

    def loss_terms(self, batch: dict) -> dict[str, Tensor]:
        """One batch's loss and its pieces (u, the target, du/dt, t, r)."""
        c = self.cfg.meanflow
        x0 = self.encode_x0(batch).float()
        n = x0.shape[0]
        cond, drop = self.conditions(batch)
        t, r = self.draw_t_r(n)
        eps = self.randn(*x0.shape)
        z = _b(1 - t, x0) * x0 + _b(t, x0) * eps
        v = self.velocity(x0, eps, z, t, cond, drop)
        student_cond = cond.replace(uncond=None) if cond is not None else None
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            _, dudt = jvp(lambda z_, t_: self.side.average_velocity(z_, r, t_, student_cond),
                          (z, t), (v, torch.ones_like(t)), method=c.jvp, fd_eps=c.jvp_fd_eps)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u = self.student.average_velocity(z, r, t, student_cond)
        target = meanflow_target(v.double(), dudt.double(), t, r).float()
        weighted, sq = meanflow_loss(u, target, c.adaptive_p, c.adaptive_c)
        return {"loss": weighted.mean(), "mse": sq.detach().mean() / x0[0].numel(),
                "u": u, "target": target, "dudt": dudt, "v": v, "t": t, "r": r, "z": z, "x0": x0,
                "weighted": weighted.detach(), "sq": sq.detach()}

    def train_step(self, batch: dict) -> dict[str, float]:
        terms = self.loss_terms(batch)
        self.step("unet", terms["loss"])
        neq = (terms["t"] > terms["r"]).double()
        return {"loss": terms["loss"].detach(), "mse": terms["mse"],
                "r_neq_t": neq.mean(), "dudt_rms": terms["dudt"].detach().pow(2).mean().sqrt()}

    # -- sampling -----------------------------------------------------------------------
    def generator_unet(self) -> nn.Module:
        return self.ema_or_online("unet", self.unet)

    def sample_timesteps(self, steps: int) -> Optional[Tensor]:
        """Native grid: [t_max] (1 NFE) and [t_max, τ(meanflow.two_step_t)] (2 NFE)."""
        sched = self.backbone.schedule
        first = torch.tensor([sched.t_max], dtype=torch.float64)
        if steps == 1:
            return first
        if steps == 2:
            return torch.cat([first, native_time(sched, torch.tensor(
                [self.cfg.meanflow.two_step_t], dtype=torch.float64))])
        return None

    def eval_spec(self, unet: Optional[nn.Module] = None):
        from diffdistill.eval.eval_model import EvalModel

        bb = self.backbone
        net = unet if unet is not None else self.generator_unet()
        return EvalModel(self.method, bb, FlowMap(bb.denoiser(net), self.delta_dim), "meanflow",
                         timesteps=self.sample_timesteps,
                         sampler_opts={"clip_denoised": bb.kind == "pixel"})

    def grid_step_counts(self) -> list[int]:
        return [1, 2]

    def sample_latents(self, seeds: list[int], cond: Optional[Cond], steps: int) -> Tensor:
        """The trainer's own ``steps``-NFE samples (latents / pixels, float32): what an export
        must reproduce."""
        from diffdistill.backbone import grid_shape
        from diffdistill.sampling import generate

        spec = self.eval_spec()
        return generate(spec.denoiser, seeds=seeds,
                        shape=grid_shape(self.backbone, self.cfg.data.resolution),
                        cond_fn=lambda sl: cond.index(sl) if cond is not None else None,
                        sampler="meanflow", timesteps=self.sample_timesteps(steps),
                        sampler_opts=spec.sampler_opts, output="latents", progress=False)

    # -- export ---------------------------------------------------------------------------
    def export(self, out_dir: Path) -> Optional[Path]:
        """SD-class: the stock ``LatentConsistencyModelPipeline`` folder (the UNet with
        ``time_cond_proj_dim``), whose one step at ``guidance_scale = 1 + t_hi`` is the 1-NFE
        sample. SD3-class: the stock ``StableDiffusion3Pipeline`` folder (the wider pooled
        input), one Euler step from σ = 1 with the Δ-embedding appended to the pooled text.
        Pixel: the stock ``UNet2DModel`` folder (``class_embed_type="identity"``), its
        scheduler and :data:`~diffdistill.flowmap.TWO_TIME_FILE` (class table and Δ-MLP)."""
        from diffdistill.export import save_full_pipeline, write_export_info, write_model_card

        bb, c = self.backbone, self.cfg.meanflow
        net = self.generator_unet()
        out = Path(out_dir)
        t_hi = float(self.student.t_hi)
        extra = {"source of v": c.source, "initialisation": c.init,
                 "guidance ω (folded in)": c.guidance_scale,
                 "two-step intermediate flow time": c.two_step_t,
                 "second time": "Δ = t − r, LCM guidance-scale embedding of Δ (sinusoids of "
                                "1000·Δ)"}
        if bb.kind == "pixel":
            out.mkdir(parents=True, exist_ok=True)
            net.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
            from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
            from safetensors.torch import save_file

            cls = (FlowMatchEulerDiscreteScheduler if bb.schedule.kind == "flow"
                   else DDPMScheduler)
            cls.from_config(bb.scheduler_config).save_pretrained(str(out / "scheduler"))
            save_file(net.extra_state_dict(), str(out / TWO_TIME_FILE))
            if bb.num_classes is not None:
                (out / "diffdistill.json").write_text(json.dumps(
                    {"num_classes": bb.num_classes, "null_class": bb.null_class}, indent=1))
            code = self._pixel_card_code(str(out), net) if bb.schedule.kind == "flow" else (
                "# a VP-parameterised pixel flow map has no stock snippet yet: the UNet folder\n"
                "# loads with UNet2DModel; see diffdistill.flowmap.FlowMap for its use\n")
            scheduler = cls.__name__
        elif bb.kind == "sd3":  # the teacher's FlowMatchEuler: one Euler step from σ = 1
            save_full_pipeline(bb, net, out, scheduler="teacher")
            code = self._sd3_card_code(str(out))
            scheduler = "FlowMatchEulerDiscreteScheduler"
        else:
            save_full_pipeline(bb, net, out, scheduler="lcm")
            code = self._latent_card_code(str(out), t_hi)
            scheduler = "LCMScheduler"
        write_export_info(out, **self.eval_spec(net).export_info(1, [2]), method=self.method,
                          flow_t_max=t_hi)
        write_model_card(out, prompt=self.card_prompt(), method=self.method,
                         base_model=self.cfg.model.path, steps=1, guidance_scale=1.0,
                         scheduler=scheduler, lora=False, kind=bb.kind, extra=extra, code=code)
        return out

    def _latent_card_code(self, folder: str, t_hi: float) -> str:
        return ("import torch\n"
                "from diffusers import LatentConsistencyModelPipeline\n"
                f"pipe = LatentConsistencyModelPipeline.from_pretrained({folder!r})\n"
                "# one MeanFlow step x = z - t*u(z, 0, t) from t = t_max: the UNet reads\n"
                "# Δ = t - r through LCM's w-embedding, w = guidance_scale - 1\n"
                f"image = pipe({self.card_prompt()!r}, num_inference_steps=1, "
                f"guidance_scale={1.0 + t_hi!r},\n"
                f"             generator=torch.Generator().manual_seed(0)).images[0]\n"
                "image.save(\"sample.png\")\n")

    def _sd3_card_code(self, folder: str) -> str:
        bb = self.backbone
        extra = "" if bb.text_encoder_3 is not None else ", text_encoder_3=None, tokenizer_3=None"
        length = ("" if bb.max_sequence_length is None
                  else f", max_sequence_length={bb.max_sequence_length}")
        return ("import torch\n"
                "from diffusers import StableDiffusion3Pipeline\n"
                "from diffusers.models.embeddings import get_timestep_embedding\n"
                f"pipe = StableDiffusion3Pipeline.from_pretrained({folder!r}{extra})\n"
                f"text, _, pooled, _ = pipe.encode_prompt({self.card_prompt()!r}, None, None, "
                f"do_classifier_free_guidance=False{length})\n"
                "# one MeanFlow step x = z - u(z, 0, 1): Δ = t - r = 1 rides on the pooled text\n"
                "d = get_timestep_embedding(torch.tensor([1000.0]), "
                f"{self.delta_dim}, flip_sin_to_cos=False, downscale_freq_shift=1)\n"
                "image = pipe(prompt_embeds=text, pooled_prompt_embeds=torch.cat([pooled, d], 1),"
                f" sigmas=[1.0],\n             guidance_scale=1.0{length}, "
                "generator=torch.Generator().manual_seed(0)).images[0]\n"
                "image.save(\"sample.png\")\n")

    def _pixel_card_code(self, folder: str, net: TwoTimeUNet2D) -> str:
        res, m = self.cfg.data.resolution, self.cfg.meanflow.two_step_t
        ch = net.unet.config.in_channels
        label = "e['class_embedding.weight'][y] + " if net.class_table is not None else ""
        return (
            "import torch, torch.nn.functional as F\n"
            "from diffusers import UNet2DModel\n"
            "from diffusers.models.embeddings import get_timestep_embedding\n"
            "from safetensors.torch import load_file\n"
            f"unet = UNet2DModel.from_pretrained({folder!r}, subfolder='unet').eval()\n"
            f"e = load_file({folder + '/' + TWO_TIME_FILE!r})  # class table, Δ-MLP\n"
            "def u(z, r, t, y):  # MeanFlow's average velocity u(z, r, t | y), times in [0, 1]\n"
            f"    d = get_timestep_embedding(1000 * (t - r), {net.delta_dim}, "
            "flip_sin_to_cos=False, downscale_freq_shift=1)\n"
            f"    c = {label}F.linear(F.silu(F.linear(d, e['linear_1.weight'], "
            "e['linear_1.bias'])), e['linear_2.weight'], e['linear_2.bias'])\n"
            "    return unet(z, 1000 * t, class_labels=c).sample\n"
            f"z = torch.randn(1, {ch}, {res}, {res}, generator=torch.Generator().manual_seed(0))"
            "\n"
            f"with torch.no_grad():  # one step (two: z -= {1 - m:g} * u(z, {m:g}, 1, y), then "
            f"from t = {m:g})\n"
            "    x = (z - u(z, torch.zeros(1), torch.ones(1), torch.tensor([0]))).clamp(-1, 1)\n"
            "image = ((x[0] + 1) * 127.5).round().to(torch.uint8)\n")


__all__ = ["FLOW_SCHEDULER", "MeanFlowConfig", "MeanFlowSection", "MeanFlowTrainer", "draw_t_r",
           "mix_cond"]
