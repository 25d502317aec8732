"""Flow maps u_θ(z, r, t): a second time input on stock diffusers backbones, and MeanFlow's
average velocity over any toolkit denoiser (Geng et al. 2025, "Mean Flows for One-step
Generative Modeling"; equation numbers are the paper's).

**The flow frame.** MeanFlow writes z_t = (1 − t)·x + t·ε, t ∈ [0, 1], with the instantaneous
velocity v = ε − x and the average velocity u(z_t, r, t) = 1/(t − r)·∫_r^t v(z_τ, τ) dτ,
so that z_r = z_t − (t − r)·u(z_t, r, t) (at r = 0, t = 1: one step x = ε − u(ε, 0, 1)). Every
schedule of the toolkit writes x_τ = α_τ·x + σ_τ·ε at its native time τ; matching the
signal-to-noise ratio (as :mod:`diffdistill.trigflow` does for TrigFlow):

    t = σ_τ / (α_τ + σ_τ),        x_τ = (α_τ + σ_τ)·z_t          (same x, ε)

(the identity on a rectified flow, where α + σ = 1 and t = τ/T). A network's prediction at
(x_τ, τ) — ε, v, x0 or a flow velocity, turned into (x0̂, ε̂) once by the
:class:`~diffdistill.denoiser.Denoiser` — is a velocity in the flow frame, u = ε̂ − x0̂, and
then z_t = (1 − t)·x0̂ + t·ε̂ holds exactly. So a jump to r is the DDIM step with (x0̂, ε̂):
x_r = α_r·x0̂ + σ_r·ε̂ on the native grid, and x0̂ itself at r = 0.

**The second time.** MeanFlow embeds (t, t − r) and sums the two embeddings (its
"conditioning on (r, t)"). The backbone's own timestep input keeps t (as the native τ(t), so a
teacher's weights keep their meaning); the extra input is Δ = t − r, embedded as LCM embeds
its guidance scale (:func:`delta_embedding`: sinusoids of 1000·Δ, diffusers'
``LatentConsistencyModelPipeline.get_guidance_scale_embedding``) and carried as
``Cond.timestep_cond`` (UNets) or appended to ``Cond.pooled_projections`` (SD3):

* ``UNet2DConditionModel`` (SD-class latents): its stock ``time_cond_proj_dim`` /
  ``timestep_cond`` path — ``TimestepEmbedding.cond_proj`` (a bias-free linear map) adds the
  projected Δ-embedding to the time embedding's input. The student is the teacher's config
  with ``time_cond_proj_dim`` set, its weights, and ``cond_proj`` initialised to zero, so
  u_θ(z, r, t) = v_teacher(z, t) for every r at the start, bit for bit. The folder loads with
  the stock class; ``LatentConsistencyModelPipeline`` samples one step with
  ``guidance_scale = 1 + Δ`` (its w-embedding is exactly this Δ-embedding).
* ``UNet2DModel`` (class-conditional pixels): the stock class has one extra embedding slot, the
  class embedding, which the class labels already use. :class:`TwoTimeUNet2D` therefore sets
  the stock ``class_embed_type="identity"`` (the UNet adds whatever vector it is given as
  ``class_labels`` to its time embedding) and computes that vector outside the UNet:
  class_table[y] + g(Δ-embedding), g a diffusers ``TimestepEmbedding`` (linear, SiLU, linear)
  whose last layer starts at zero — again the teacher exactly at the start. The UNet folder
  loads with stock ``UNet2DModel``; the class table and g are a documented extra file
  (:data:`TWO_TIME_FILE`) of a few tensors. (An unconditional pixel UNet gets the same module
  with no class table.)
* ``SD3Transformer2DModel`` (flow transformers): its time embedding takes the time and the
  pooled text only (``CombinedTimestepTextProjEmbeddings``), so the Δ-embedding rides on the
  pooled text: ``pooled_projection_dim`` widened by the Δ-width, the new input columns of
  ``text_embedder.linear_1`` zero — the teacher exactly at the start, a stock class, and the
  stock ``StableDiffusion3Pipeline`` samples it with
  ``pooled_prompt_embeds = [pooled text, Δ-embedding]``. (Flux: not yet.)

The JVP of u_θ along (v, 0, 1) over (z, r, t) (Eq. 8) differentiates through all of this —
the native time τ(t), the input scale and Δ — with :func:`diffdistill.jvp.jvp`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .denoiser import (
    Cond,
    Denoiser,
    DenoiserBase,
    Prediction,
    guidance_scale_embedding,
    is_transformer,
)
from .schedule import NoiseSchedule

Tensor = torch.Tensor

#: the extra file of a pixel flow-map export: the class table and the Δ-embedding MLP
TWO_TIME_FILE = "two_time_embedding.safetensors"


# ----------------------------------------------------------------------------- time frames


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device, like.dtype)


def flow_time(schedule: NoiseSchedule, tau) -> Tensor:
    """t = σ_τ/(α_τ + σ_τ): the flow time of native time τ (float64)."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(tau, dtype=torch.float64))
    return sigma / (alpha + sigma)


def native_time(schedule: NoiseSchedule, t) -> Tensor:
    """The native τ whose flow time is ``t`` (forward-mode differentiable in t): t·T on a
    rectified flow, else the time of VE sigma t/(1 − t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule.kind == "flow":
        return t * schedule.num_train_timesteps
    return schedule.t_of_sigma(t / (1 - t))


def flow_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """The flow times of the schedule's t_min and t_max (a VP table never reaches t = 1)."""
    if schedule.kind == "flow":
        return 0.0, 1.0
    return float(flow_time(schedule, schedule.t_min)), float(flow_time(schedule, schedule.t_max))


def delta_embedding(delta, dim: int) -> Tensor:
    """The embedding of Δ = t − r: sinusoids of 1000·Δ (LCM's guidance-scale embedding of
    w = Δ; :func:`~diffdistill.denoiser.guidance_scale_embedding`), float32."""
    return guidance_scale_embedding(delta, dim)


# ----------------------------------------------------------------------------- backbones


class TwoTimeUNet2D(nn.Module):
    """A stock ``UNet2DModel`` with ``class_embed_type="identity"`` plus what it is handed as
    ``class_labels``: class_table[y] (the teacher's class embedding) + g(timestep_cond), g a
    diffusers ``TimestepEmbedding`` whose last layer is zero-initialised. Called like the
    UNet: ``net(x, timestep, class_labels=y, timestep_cond=delta_embedding(Δ, dim))``."""

    def __init__(self, unet: nn.Module, class_table: Optional[nn.Embedding], delta_dim: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        if getattr(unet.config, "class_embed_type", None) != "identity":
            raise ValueError("TwoTimeUNet2D needs a UNet2DModel with class_embed_type='identity'")
        self.unet = unet
        self.class_table = class_table
        width = unet.time_embedding.linear_2.out_features
        self.delta_embedding = TimestepEmbedding(delta_dim, width)
        nn.init.zeros_(self.delta_embedding.linear_2.weight)
        nn.init.zeros_(self.delta_embedding.linear_2.bias)
        self.delta_dim = int(delta_dim)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def embedding(self, batch: int, class_labels=None, timestep_cond=None) -> Tensor:
        """The vector the identity class embedding adds to the time embedding."""
        dt, dev = self.unet.dtype, self.unet.conv_in.weight.device
        out = torch.zeros(batch, self.delta_embedding.linear_2.out_features, dtype=dt,
                          device=dev)
        if self.class_table is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            out = self.class_table(class_labels.to(dev)).to(dt)
        if timestep_cond is not None:
            out = out + self.delta_embedding(timestep_cond.to(dev, dt))
        return out

    def forward(self, sample: Tensor, timestep, class_labels=None, timestep_cond=None,
                return_dict: bool = True):
        vec = self.embedding(sample.shape[0], class_labels, timestep_cond)
        return self.unet(sample, timestep, class_labels=vec, return_dict=return_dict)

    def extra_state_dict(self) -> dict[str, Tensor]:
        """What :data:`TWO_TIME_FILE` holds: ``class_embedding.weight`` (if any) and the
        Δ-MLP's ``linear_1`` / ``linear_2`` weights and biases."""
        sd = {f"{k}": v.detach().float().contiguous().cpu()
              for k, v in self.delta_embedding.state_dict().items()}
        if self.class_table is not None:
            sd["class_embedding.weight"] = self.class_table.weight.detach().float().cpu()
        return sd


def _is_sd3(net: nn.Module) -> bool:
    return type(net).__name__ == "SD3Transformer2DModel"


def default_delta_dim(net: nn.Module) -> int:
    """The Δ-embedding's default width: that of the network's own time projection."""
    if _is_sd3(net):
        return net.time_text_embed.time_proj.num_channels
    return int(net.config["block_out_channels"][0])


def second_time_dim(net: nn.Module) -> Optional[int]:
    """The width of the Δ-embedding a network reads (None: it has no second time)."""
    if isinstance(net, TwoTimeUNet2D):
        return net.delta_dim
    inner = getattr(net, "module", None)
    if inner is not None and inner is not net:
        return second_time_dim(inner)
    return getattr(getattr(net, "config", None), "time_cond_proj_dim", None)


def add_second_time(net: nn.Module, dim: Optional[int] = None) -> nn.Module:
    """``net`` with a zero-initialised Δ = t − r input (see the module docstring): a new
    ``UNet2DConditionModel`` with ``time_cond_proj_dim=dim``, or a :class:`TwoTimeUNet2D`
    around a ``UNet2DModel``. Its outputs equal ``net``'s exactly for every Δ until trained.
    ``dim`` defaults to the width of the network's own time projection."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    # without the private keys: ``_use_default_values`` would make from_config ignore the
    # very entries changed here
    cfg = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    dim = int(dim or default_delta_dim(net))
    state = net.state_dict()
    if _is_sd3(net):
        from diffusers import SD3Transformer2DModel

        key = "time_text_embed.text_embedder.linear_1.weight"
        new = SD3Transformer2DModel.from_config(
            {**cfg, "pooled_projection_dim": cfg["pooled_projection_dim"] + dim})
        w = state[key]
        state = {**state, key: torch.cat([w, w.new_zeros(w.shape[0], dim)], dim=1)}
        new.load_state_dict(state, strict=True)
        p = next(net.parameters())
        return new.to(p.device, p.dtype)
    if isinstance(net, UNet2DConditionModel):
        if cfg.get("time_cond_proj_dim") is not None:
            raise ValueError("this UNet2DConditionModel already embeds a timestep_cond "
                             f"(time_cond_proj_dim={cfg['time_cond_proj_dim']}, e.g. LCM's "
                             "guidance scale): it has no free slot for MeanFlow's second time")
        new = UNet2DConditionModel.from_config({**cfg, "time_cond_proj_dim": dim})
        missing, unexpected = new.load_state_dict(state, strict=False)
        if sorted(missing) != ["time_embedding.cond_proj.weight"] or unexpected:
            raise ValueError(f"adding time_cond_proj_dim changed more than cond_proj: "
                             f"missing {missing}, unexpected {unexpected}")
        nn.init.zeros_(new.time_embedding.cond_proj.weight)
        return new.to(next(net.parameters()).device, next(net.parameters()).dtype)
    if isinstance(net, UNet2DModel):
        kind = cfg.get("class_embed_type")
        if kind is not None:
            raise ValueError(f"UNet2DModel with class_embed_type={kind!r}: only the plain class "
                             "table (or none) can take MeanFlow's second time")
        table = None
        if cfg.get("num_class_embeds") is not None:
            table = nn.Embedding(cfg["num_class_embeds"], net.class_embedding.embedding_dim)
            table.load_state_dict(net.class_embedding.state_dict())
            state = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
        unet = UNet2DModel.from_config({**cfg, "class_embed_type": "identity",
                                        "num_class_embeds": None})
        unet.load_state_dict(state, strict=True)
        p = next(net.parameters())
        return TwoTimeUNet2D(unet, table, dim).to(p.device, p.dtype)
    raise ValueError(f"{type(net).__name__}: MeanFlow's second time is implemented for "
                     "UNet2DModel, UNet2DConditionModel and SD3Transformer2DModel (not Flux "
                     "yet)")


# ----------------------------------------------------------------------------- the flow map


class FlowMap(DenoiserBase):
    """u_θ(z, r, t | c) over a :class:`~diffdistill.denoiser.Denoiser` whose network reads
    Δ = t − r through ``timestep_cond`` (:func:`add_second_time`).

    Three views of one network: :meth:`average_velocity` (the flow frame, MeanFlow's u — what
    the loss and the JVP see), :meth:`jump` (the native frame: (x0̂, ε̂) of the jump from native
    time τ to flow time r, what the sampler steps with) and, as a
    :class:`~diffdistill.denoiser.DenoiserBase`, ``self(x, τ, cond)`` = the jump with r = t,
    i.e. the instantaneous velocity (an ordinary denoiser any sampler can run)."""

    def __init__(self, denoiser: Denoiser, delta_dim: Optional[int] = None):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        #: SD3: the Δ-embedding is appended to the pooled text (its width must then be given)
        self.pooled = is_transformer(denoiser.unet)
        dim = delta_dim or second_time_dim(denoiser.unet)
        if dim is None:
            raise ValueError("FlowMap needs a network with a second time input "
                             "(diffdistill.flowmap.add_second_time) and, for a transformer, "
                             "the width of its Δ-embedding")
        self.delta_dim = int(dim)
        self.t_lo, self.t_hi = flow_range(self.schedule)

    def _cond(self, cond: Optional[Cond], delta: Tensor, device) -> Cond:
        emb = delta_embedding(delta, self.delta_dim).to(device)
        cond = (cond or Cond()).replace(uncond=None)
        if self.pooled:
            pooled = cond.pooled_projections
            return cond.replace(pooled_projections=torch.cat([pooled, emb.to(pooled.dtype)], 1))
        return cond.replace(timestep_cond=emb)

    def jump(self, x: Tensor, tau, cond: Optional[Cond], r, guidance_scale=1.0) -> Prediction:
        """(x0̂, ε̂) at native (x, τ) with Δ = t(τ) − r: the jump lands on
        α_r·x0̂ + σ_r·ε̂ (x0̂ at r = 0). ``guidance_scale`` ≠ 1: CFG on both, one batched call."""
        tau = torch.as_tensor(tau, dtype=torch.float64)
        if tau.ndim == 0:
            tau = tau.expand(x.shape[0])
        delta = flow_time(self.schedule, tau.cpu()) - torch.as_tensor(r, dtype=torch.float64)
        delta = delta.expand(x.shape[0]) if delta.ndim == 0 else delta
        if cond is None or guidance_scale == 1.0:
            return self.denoiser(x, tau, self._cond(cond, delta, x.device))
        if cond.uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs Cond.uncond")
        both = Cond.cat([cond.replace(uncond=None), cond.uncond])
        pred = self.denoiser(torch.cat([x, x]), torch.cat([tau, tau]),
                             self._cond(both, torch.cat([delta, delta]), x.device))
        (xc, xu), (ec, eu) = pred.x0.chunk(2), pred.eps.chunk(2)
        s = guidance_scale
        return Prediction(xu + s * (xc - xu), eu + s * (ec - eu))

    def forward(self, x: Tensor, t, cond: Optional[Cond] = None) -> Prediction:
        tau = torch.as_tensor(t, dtype=torch.float64)
        tau = tau.expand(x.shape[0]) if tau.ndim == 0 else tau
        return self.jump(x, tau, cond, flow_time(self.schedule, tau.cpu()))

    def to_native(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_τ, τ) of the flow-frame (z, t): τ = τ(t), x_τ = (α_τ + σ_τ)·z."""
        tau = native_time(self.schedule, t)
        alpha, sigma = self.schedule.alpha_sigma(tau)
        return z * _bcast(alpha + sigma, z), tau

    def average_velocity(self, z: Tensor, r: Tensor, t: Tensor,
                         cond: Optional[Cond] = None) -> Tensor:
        """u_θ(z, r, t | c) in the flow frame (t, r: per-sample float64 flow times; t is
        clamped to the schedule's range by the caller)."""
        x, tau = self.to_native(z, t)
        pred = self.denoiser(x, tau, self._cond(cond, t - r, z.device))
        return pred.eps - pred.x0


# ----------------------------------------------------------------------------- the objective


def meanflow_target(v: Tensor, dudt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """u_tgt = v − (t − r)·du/dt (Geng et al. 2025, Eq. 10; du/dt = v·∂_z u + ∂_t u, Eq. 8)."""
    return v - _bcast(t - r, v) * dudt


def adaptive_weight(sq_norm: Tensor, p: float = 1.0, c: float = 1e-3) -> Tensor:
    """w = sg(1/(‖Δ‖² + c)^p) per sample (Geng et al. 2025, adaptive loss weighting; p = 1, c = 1e-3)."""
    return 1.0 / (sq_norm.detach() + c).pow(p)


def meanflow_loss(u: Tensor, target: Tensor, p: float = 1.0, c: float = 1e-3
                  ) -> tuple[Tensor, Tensor]:
    """Per-sample (w·‖u − sg(u_tgt)‖², ‖u − sg(u_tgt)‖²) with ‖·‖² the squared L2 norm
    (the adaptively weighted loss; p = 0 is plain L2), in float32 at least."""
    dt = torch.promote_types(u.dtype, torch.float32)
    sq = (u.to(dt) - target.detach().to(dt)).pow(2).flatten(1).sum(dim=1)
    return adaptive_weight(sq, p, c) * sq, sq


__all__ = ["FlowMap", "TWO_TIME_FILE", "TwoTimeUNet2D", "adaptive_weight", "add_second_time",
           "default_delta_dim", "delta_embedding", "flow_range", "flow_time", "meanflow_loss", "meanflow_target",
           "native_time", "second_time_dim"]
