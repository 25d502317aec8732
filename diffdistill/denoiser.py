"""The denoiser: the one place that knows diffusers timesteps, prediction types and conditioning.

Teacher, student, fake score, target network and every sampler talk to a network through
``model(x_t, t, cond) -> Prediction(x0, eps)`` where ``x_t = alpha_t x0 + sigma_t eps`` and
``t`` is the schedule's native time (see :mod:`diffdistill.schedule`). Following EDM's
preconditioning-as-a-wrapper (Karras et al. 2022, Table 1) the raw diffusers UNet is called
inside; the prediction is converted once, here, to x0̂ and ε̂ in float32 (or float64):

* ``epsilon``:       x0 = (x − σ ε̂) / α
* ``v_prediction``:  x0 = α x − σ v̂,  ε = σ x + α v̂             (Salimans & Ho 2022)
* ``sample``:        ε = (x − α x0̂) / σ
* ``cm``:            consistency-model preconditioning of diffusers'
  ``CMStochasticIterativeScheduler`` (Song et al. 2023, App. C): UNet input c_in·x with
  c_in = 1/sqrt(σ²+σd²), timestep 250·log σ, x0 = c_skip x + c_out F with
  c_skip = σd²/((σ−σmin)²+σd²), c_out = σd(σ−σmin)/sqrt(σ²+σd²).

:class:`LCMConsistency` adds the LCM boundary condition on top of any VP denoiser
(Luo et al. 2023, Eq. 9; c_skip = σd²/((10t)²+σd²), c_out = 10t/sqrt((10t)²+σd²)).
Classifier-free guidance (Ho & Salimans 2022) is :meth:`DenoiserBase.guided`; the LCM /
"Imagen" form x0̂ = x0̂_c + w(x0̂_c − x0̂_u) is the same operation with scale = w + 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .schedule import NoiseSchedule

Tensor = torch.Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "cm", "flow")


class Prediction(NamedTuple):
    x0: Tensor
    eps: Tensor


@dataclass
class Cond:
    """Everything a UNet is conditioned on, batched along dim 0.

    ``uncond`` holds the unconditional counterpart used by classifier-free guidance (the
    empty-prompt embedding, or the null class); it is ``None`` when guidance is impossible.
    """

    encoder_hidden_states: Optional[Tensor] = None
    added_cond_kwargs: Optional[dict] = None  # SDXL: {"text_embeds", "time_ids"}
    class_labels: Optional[Tensor] = None
    timestep_cond: Optional[Tensor] = None  # LCM guidance-scale (w) embedding
    pooled_projections: Optional[Tensor] = None  # SD3: both CLIPs' pooled projections
    #: a guidance-distilled model's guidance input per sample (Flux-dev's embedded guidance)
    guidance: Optional[Tensor] = None
    uncond: Optional["Cond"] = field(default=None, repr=False)

    # -- construction helpers -------------------------------------------------------
    def map(self, fn: Callable[[Tensor], Tensor], with_uncond: bool = True) -> "Cond":
        """Apply ``fn`` to every tensor (recursively into ``added_cond_kwargs``)."""

        def f(v):
            if v is None:
                return None
            if isinstance(v, dict):
                return {k: fn(x) for k, x in v.items()}
            return fn(v)

        return Cond(
            encoder_hidden_states=f(self.encoder_hidden_states),
            added_cond_kwargs=f(self.added_cond_kwargs),
            class_labels=f(self.class_labels),
            timestep_cond=f(self.timestep_cond),
            pooled_projections=f(self.pooled_projections),
            guidance=f(self.guidance),
            uncond=self.uncond.map(fn) if (with_uncond and self.uncond is not None) else None,
        )

    def to(self, device=None, dtype=None) -> "Cond":
        def move(x: Tensor) -> Tensor:
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype)
            return x.to(device=device)

        return self.map(move)

    def index(self, idx) -> "Cond":
        return self.map(lambda x: x[idx])

    def repeat(self, n: int) -> "Cond":
        """Repeat every sample ``n`` times (interleaved), like ``repeat_interleave``."""
        return self.map(lambda x: x.repeat_interleave(n, dim=0))

    def replace(self, **kw) -> "Cond":
        return dataclasses.replace(self, **kw)

    @property
    def batch_size(self) -> Optional[int]:
        for v in (self.encoder_hidden_states, self.class_labels, self.timestep_cond,
                  self.pooled_projections, self.guidance):
            if v is not None:
                return v.shape[0]
        if self.added_cond_kwargs:
            return next(iter(self.added_cond_kwargs.values())).shape[0]
        return None

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch (``uncond`` dropped: the result is already paired)."""
        def cat_field(name):
            vals = [getattr(c, name) for c in conds]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate Cond: {name} missing in some parts")
            if isinstance(vals[0], dict):
                return {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
            return torch.cat(vals)

        return Cond(**{n: cat_field(n) for n in
                       ("encoder_hidden_states", "added_cond_kwargs", "class_labels",
                        "timestep_cond", "pooled_projections", "guidance")})

    def unet_kwargs(self) -> dict:
        kw = {}
        if self.encoder_hidden_states is not None:
            kw["encoder_hidden_states"] = self.encoder_hidden_states
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        if self.class_labels is not None:
            kw["class_labels"] = self.class_labels
        if self.timestep_cond is not None:
            kw["timestep_cond"] = self.timestep_cond
        if self.pooled_projections is not None:
            kw["pooled_projections"] = self.pooled_projections
        return kw


def _config_of(net: nn.Module):
    """The diffusers config of ``net`` or of the module a DDP / FSDP / peft wrapper holds."""
    for _ in range(4):
        config = getattr(net, "config", None)
        if config is not None:
            return config
        inner = getattr(net, "module", None) or getattr(net, "base_model", None)
        if inner is None or inner is net:
            return None
        net = inner
    return None


def is_transformer(net: nn.Module) -> bool:
    """Whether ``net`` (or the module a wrapper holds) is a diffusers flow transformer
    denoiser (SD3's MMDiT, Flux's transformer), not a UNet."""
    return hasattr(_config_of(net), "joint_attention_dim")


def is_flux(net: nn.Module) -> bool:
    """Whether ``net`` is a ``FluxTransformer2DModel`` (packed latents, rotary position ids)."""
    return hasattr(_config_of(net), "axes_dims_rope")


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] → Flux's tokens [B, (H/2)(W/2), 4C]: each 2×2 patch flattened channel-major
    (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latent size {h}x{w} must be even")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a latent of size ``h`` × ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """Flux's rotary position ids of the packed tokens, [(h/2)(w/2), 3]: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)



def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _per_sample_t(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries for a batch of {x.shape[0]}")
    return t


def lcm_boundary(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM boundary scalings (Luo et al. 2023; diffusers ``LCMScheduler``): (c_skip, c_out)."""
    st = t * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def cm_boundary(sigma: Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """Consistency-model scalings (Song et al. 2023, Eq. 3 / App. C): (c_skip, c_out)."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class DenoiserBase(nn.Module):
    """Anything callable as ``model(x_t, t, cond) -> Prediction``; adds CFG."""

    schedule: NoiseSchedule
    #: the model takes its guidance scale as an input (Flux-dev: one pass, no CFG pair)
    embedded_guidance: bool = False

    def forward(self, x: Tensor, t, cond: Optional[Cond] = None) -> Prediction:  # pragma: no cover
        raise NotImplementedError

    def guided(
        self, x: Tensor, t, cond: Optional[Cond], guidance_scale=1.0
    ) -> Prediction:
        """Classifier-free guidance: ``p_u + s (p_c − p_u)`` on x0̂ and ε̂ in one batched call.

        ``guidance_scale`` is a number or a tensor with one scale per sample (LCD draws
        w ~ U[w_min, w_max] per sample); a tensor always takes the guided path.
        """
        per_sample = isinstance(guidance_scale, Tensor)
        if self.embedded_guidance and cond is not None:
            # a guidance-distilled model (Flux-dev) reads the scale itself, 1.0 included, as
            # FluxPipeline passes ``guidance_scale`` to its transformer
            g = (guidance_scale.float() if per_sample
                 else torch.full((x.shape[0],), float(guidance_scale)))
            return self(x, t, cond.replace(guidance=g.to(x.device)))
        if cond is None or (not per_sample and guidance_scale == 1.0):
            return self(x, t, cond)
        if cond.uncond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs an unconditional embedding (Cond.uncond)"
            )
        t = _per_sample_t(t, x)
        both = Cond.cat([cond, cond.uncond])
        pred = self(torch.cat([x, x]), torch.cat([t, t]), both)
        x0_c, x0_u = pred.x0.chunk(2)
        eps_c, eps_u = pred.eps.chunk(2)
        s = _bcast(guidance_scale.to(x0_c.device, x0_c.dtype), x0_c) if per_sample else (
            guidance_scale)
        return Prediction(x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u))


class Denoiser(DenoiserBase):
    """Wrap a diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` as x0̂ / ε̂ predictor."""

    def __init__(
        self,
        unet: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        sigma_data: float = 0.5,  # CM/LCM default (Song et al. 2023)
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is unknown; use one of {PREDICTION_TYPES}"
            )
        if prediction_type == "cm" and schedule.kind != "ve":
            raise ValueError("prediction_type='cm' needs a VESchedule (time = sigma)")
        if (prediction_type == "flow") != (schedule.kind == "flow"):
            raise ValueError("a rectified-flow model (FlowSchedule) predicts the velocity: "
                             "prediction_type='flow' goes with a FlowSchedule and only with it")
        self.unet = unet
        # an MMDiT (SD3Transformer2DModel) takes the timestep as a keyword, after the text
        self.timestep_keyword = is_transformer(unet)
        # Flux: packed 2x2 latent tokens, position ids, time in [0, 1], embedded guidance
        self.packed = is_flux(unet)
        self.embedded_guidance = self.packed and bool(
            getattr(_config_of(unet), "guidance_embeds", False))
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.sigma_data = sigma_data
        self.compute_dtype = compute_dtype

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def raw(self, x: Tensor, timestep: Tensor, cond: Optional[Cond]) -> Tensor:
        """The bare UNet call (inputs cast to the UNet's dtype)."""
        dt = self.model_dtype
        kwargs = (cond.to(dtype=dt) if cond is not None else Cond()).unet_kwargs()
        timestep = timestep.to(x.device, torch.float32)
        if self.packed:
            return self._flux_call(x.to(dt), timestep, cond)
        if self.timestep_keyword:
            out = self.unet(x.to(dt), timestep=timestep, **kwargs)
        else:
            out = self.unet(x.to(dt), timestep, **kwargs)
        if torch.is_tensor(out):  # a plain network (out[0] would be its first sample)
            return out
        return out.sample if hasattr(out, "sample") else out[0]

    def _flux_call(self, x: Tensor, timestep: Tensor, cond: Optional[Cond]) -> Tensor:
        """``FluxTransformer2DModel`` as ``FluxPipeline.__call__`` runs it: packed tokens, text
        ids all zero, image ids (0, row, column), the time as σ = t / T in [0, 1] (the
        transformer scales it by 1000 itself), the guidance scale where the model embeds it:
        ``cond.guidance``, else 1 — so that an unguided call is the call at scale 1, as for
        every other model (a generator trained by plain calls samples at ``guidance_scale``
        1 in the stock pipeline too)."""
        if cond is None or cond.encoder_hidden_states is None:
            raise ValueError("a Flux transformer needs prompt conditioning (T5 states and the "
                             "pooled CLIP output)")
        dt = x.dtype
        b, _, h, w = x.shape
        text = cond.encoder_hidden_states.to(dt)
        guidance = None
        if self.embedded_guidance:
            guidance = cond.guidance if cond.guidance is not None else torch.ones(b)
            guidance = guidance.to(x.device, torch.float32)
        out = self.unet(  # the tokens positionally: a fake score with its GAN head takes them so
            pack_latents(x), timestep=timestep / self.schedule.num_train_timesteps,
            guidance=guidance, pooled_projections=cond.pooled_projections.to(dt),
            encoder_hidden_states=text, img_ids=latent_image_ids(h, w, x.device, dt),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dt))
        return unpack_latents(out.sample if hasattr(out, "sample") else out[0], h, w)

    def target(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """What the network is trained to output at x_t = α x0 + σ ε, in float32: ε
        (``epsilon``), v = α ε − σ x0 (``v_prediction``, Salimans & Ho 2022) or x0
        (``sample``), or the velocity v = ε − x0 of a rectified flow (``flow``, Liu et al. 2023;
        the flow-matching loss of SD3, Esser et al. 2024, Eq. 1). The one training target of
        every loss that fits a score network (pretraining, DMD2's fake score, Hyper-SD's)."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "sample":
            return x0.float()
        if self.prediction_type == "flow":
            return noise.float() - x0.float()
        if self.prediction_type != "v_prediction":
            raise ValueError(f"no denoising target for prediction_type="
                             f"{self.prediction_type!r}")
        alpha, sigma = self.schedule.alpha_sigma(_per_sample_t(t, x0).cpu())
        a = _bcast(alpha.float().to(x0.device), x0)
        s = _bcast(sigma.float().to(x0.device), x0)
        return a * noise.float() - s * x0.float()

    def forward(self, x: Tensor, t, cond: Optional[Cond] = None) -> Prediction:
        t = _per_sample_t(t, x).to(x.device)
        alpha, sigma = self.schedule.alpha_sigma(t.cpu())
        cd = self.compute_dtype
        a = _bcast(alpha.to(x.device, cd), x)
        s = _bcast(sigma.to(x.device, cd), x)
        xc = x.to(cd)
        if self.prediction_type == "cm":
            sd = self.sigma_data
            c_in = (s**2 + sd**2).rsqrt()
            # diffusers' CMStochasticIterativeScheduler.sigma_to_t: 1000 * 0.25 * log(sigma)
            timestep = 250.0 * torch.log(sigma + 1e-44)
            out = self.raw(c_in * xc, timestep, cond).to(cd)
            c_skip, c_out = cm_boundary(s, self.schedule.t_min, sd)
            x0 = c_skip * xc + c_out * out
            eps = (xc - x0) / s
            return Prediction(x0, eps)
        out = self.raw(x, t, cond).to(cd)
        if self.prediction_type == "epsilon":
            return Prediction((xc - s * out) / a, out)
        if self.prediction_type == "v_prediction":
            return Prediction(a * xc - s * out, s * xc + a * out)
        if self.prediction_type == "flow":  # v = ε − x0 and x = a x0 + s ε with a = 1 − s
            return Prediction(xc - s * out, xc + a * out)
        # "sample": the network predicts x0 directly
        return Prediction(out, (xc - a * out) / s)


class LCMConsistency(DenoiserBase):
    """f(x, t) = c_skip(t) x + c_out(t) x0̂(x, t) with the LCM boundary scalings."""

    def __init__(self, denoiser: Denoiser, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.embedded_guidance = denoiser.embedded_guidance
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    def forward(self, x: Tensor, t, cond: Optional[Cond] = None) -> Prediction:
        t = _per_sample_t(t, x)
        pred = self.denoiser(x, t, cond)
        c_skip, c_out = lcm_boundary(t, self.sigma_data, self.timestep_scaling)
        cd = pred.x0.dtype
        c_skip = _bcast(c_skip.to(x.device, cd), x)
        c_out = _bcast(c_out.to(x.device, cd), x)
        x0 = c_skip * x.to(cd) + c_out * pred.x0
        # Keep ε̂ from the network: LCM's multistep sampler re-noises with fresh noise and
        # TCD uses the raw ε̂, so no consumer needs ε consistent with the boundary x0.
        return Prediction(x0, pred.eps)


def guidance_scale_embedding(w: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal embedding of the guidance scale (LCM's ``time_cond_proj_dim`` input).

    Same construction as diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``
    (which embeds ``w * 1000`` where ``w = guidance_scale - 1``).
    """
    w = torch.as_tensor(w, dtype=torch.float32).flatten() * 1000.0
    half = dim // 2
    # on w's device: the trainers sample w per example on the GPU
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                     * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
