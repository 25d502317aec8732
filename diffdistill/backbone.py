"""Backbones: load a local diffusers folder once and expose what every method needs.

A :class:`Backbone` is the teacher of a distillation run plus the frozen parts around it:
the UNet, the VAE (latent models), the text encoder(s) and tokenizer(s), and the noise
schedule and prediction type read from the scheduler config. It answers the questions the
trainers ask of a model family, so that no trainer has to know whether it runs on SD1.5,
SDXL, SD3, Flux or a pixel-space class-conditional UNet:

* :meth:`Backbone.encode_prompts` — text conditioning exactly as the stock pipelines build it
  (:mod:`diffdistill.text_encoders`; SDXL adds the size/crop "time ids" of Podell et al.
  2023, Sec. 2.2), with the unconditional counterpart for classifier-free guidance and an
  in-memory cache so a prompt list that repeats is encoded once;
* :meth:`Backbone.class_cond` — class labels with the null class as the unconditional input;
* :meth:`Backbone.encode_images` / :meth:`Backbone.decode_latents` — pixels in [-1, 1] to
  the model's (scaled, shifted) latent space and back; identity for pixel models;
* :meth:`Backbone.denoiser` — the one :class:`~diffdistill.denoiser.Denoiser` interface
  over the teacher or any student UNet with the same schedule.

:func:`make_trainable` turns a UNet into a student (LoRA through peft, or full weights),
:func:`adapters_disabled` runs the same UNet without its LoRA (the teacher pass of a LoRA
student needs no second copy), :func:`set_attention_backend` picks SDPA or xformers, and
:func:`clone_unet` copies a UNet for a fake score or an EMA.

The toolkit never downloads: every path is a local folder (``HF_HUB_OFFLINE`` semantics;
:mod:`diffdistill.model_folder` checks it). Components are loaded one by one with their own
classes (the ones ``model_index.json`` names) rather than through
``DiffusionPipeline.from_pretrained``, so a run only loads the parts it needs
(``load_text=False`` when prompt embeddings are cached, ``load_vae=False`` when latents are
cached). :meth:`Backbone.set_resolution` sets the size a run generates at (a Flux-class flow
shifts its timesteps by it).

Class-conditional pixel teachers and the null class: a toolkit teacher trained with label
dropout has ``num_class_embeds = num_classes + 1`` and the last index is the null class
(see :func:`diffdistill.tiny.tiny_pixel_unet`). The config cannot tell such a UNet from
one whose every embedding is a real class, so the rule is by pipeline type, with an
override: ``DDPMPipeline`` / ``DDIMPipeline`` / bare UNet folders are read as
"classes + null"; ``ConsistencyModelPipeline`` folders (e.g. OpenAI's ImageNet-64 CMs) as
"all classes, no null"; ``load_backbone(..., num_classes=N)`` overrides either, and a
``diffdistill.json`` file in the folder (written by :mod:`diffdistill.export`) wins over
the rule.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .denoiser import PREDICTION_TYPES, Cond, Denoiser
from .model_folder import (  # noqa: F401  (PIPELINE_KINDS, folder_kind: public via this module)
    NETWORK_COMPONENT,
    PIPELINE_KINDS,
    SIDECAR,
    TEXT_COMPONENTS,
    bare_scheduler_config_path,
    component_class,
    folder_kind,
    load_component,
    supported_pipelines,
    validate_model_folder,
)
from .schedule import FLOW_SCHEDULERS, NoiseSchedule, schedule_from_scheduler_config

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _square_size(sample_size) -> int:
    if isinstance(sample_size, (list, tuple)):  # some configs store (height, width)
        return int(max(sample_size))
    return int(sample_size)


def load_backbone(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    load_text: bool = True,
    load_vae: bool = True,
    num_classes: Optional[int] = None,
    variant: Optional[str] = None,
    prediction_type: Optional[str] = None,
) -> "Backbone":
    """Load a local diffusers folder (SD1.5-, SDXL-, SD3-, Flux- or pixel-structured) as a
    :class:`Backbone`.

    ``num_classes`` overrides the null-class rule for class-conditional pixel UNets (see the
    module docstring); ``variant`` selects e.g. ``diffusion_pytorch_model.fp16.safetensors``;
    ``prediction_type`` overrides the scheduler config's (for a mislabelled folder).
    """
    from .quiet import apply_to_loaded_libraries

    apply_to_loaded_libraries()
    folder, index = validate_model_folder(path)
    sidecar = _read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}

    if index is None:  # bare UNet2DModel + scheduler config
        unet = load_component(folder.parent, ("diffusers", "UNet2DModel"), folder.name, dtype,
                           device, variant)
        sched_cfg = _read_json(bare_scheduler_config_path(folder))
        pipeline_class = "UNet2DModel"
        kind = "pixel"
        parts: dict[str, Any] = {}
    else:
        pipeline_class = index.get("_class_name", "")
        if pipeline_class not in PIPELINE_KINDS:
            raise ValueError(
                f"{str(folder)!r} holds a {pipeline_class or 'unnamed'} pipeline, which this "
                f"toolkit does not support; supported pipeline classes: {supported_pipelines()}"
            )
        kind = PIPELINE_KINDS[pipeline_class]
        net = NETWORK_COMPONENT.get(kind, "unet")
        required_parts = (net, "scheduler") + (("vae",) if kind != "pixel" else ())
        for required in required_parts:
            if not index.get(required) or index[required][0] is None:
                raise ValueError(f"{str(folder)!r}: model_index.json lists no {required!r}")
        unet = load_component(folder, index[net], net, dtype, device, variant)
        sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
        parts = {}
        if kind != "pixel":
            vae_entry = index.get("vae")
            if load_vae:
                vae = load_component(folder, vae_entry, "vae", dtype, device, variant)
                if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
                    # SD/SDXL VAEs overflow in fp16 (the pipelines upcast for the same reason)
                    vae = vae.to(torch.float32)
                parts["vae"] = vae
            parts["vae_config"] = _read_json(folder / "vae" / "config.json")
            names = list(TEXT_COMPONENTS[kind])
            if kind == "sd3" and (index.get("text_encoder_3") or [None])[0] is not None:
                names += ["text_encoder_3", "tokenizer_3"]  # T5: optional in SD3
            if load_text:
                for name in names:
                    entry = index.get(name)
                    if not entry or entry[0] is None:
                        raise ValueError(f"{str(folder)!r}: model_index.json lists no {name!r}")
                    if name.startswith("tokenizer"):
                        parts[name] = component_class(entry, name).from_pretrained(
                            str(folder / name))
                    else:
                        parts[name] = load_component(folder, entry, name, dtype, device, variant)
            parts["force_zeros_for_empty_prompt"] = bool(
                index.get("force_zeros_for_empty_prompt", kind == "sdxl"))

    if (pipeline_class == "ConsistencyModelPipeline"
            or sched_cfg.get("_class_name") == "CMStochasticIterativeScheduler"):
        # a latent pipeline with the CM scheduler (an iCT latent export) is a CM as well
        prediction_type = "cm"
        sched_cfg.setdefault("_class_name", "CMStochasticIterativeScheduler")
    elif sched_cfg.get("_class_name") in FLOW_SCHEDULERS:
        prediction_type = "flow"  # a rectified flow's network predicts the velocity
    else:
        prediction_type = prediction_type or sched_cfg.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES or prediction_type in ("cm", "flow"):
            raise ValueError(
                f"{str(path)!r}: the scheduler's prediction_type={prediction_type!r} is unknown "
                f"for its {sched_cfg.get('_class_name', 'DDPM-family')} scheduler; supported: "
                "epsilon, v_prediction, sample (set model.prediction_type to override a "
                "mislabelled folder)")
    schedule = schedule_from_scheduler_config(sched_cfg)

    if kind == "pixel":
        vae_scale_factor = 1
        latent_channels = unet.config.in_channels
        n_embeds = getattr(unet.config, "num_class_embeds", None)
        null_class: Optional[int] = None
        n_cls: Optional[int] = None
        if n_embeds:
            if num_classes is None and "num_classes" in sidecar:
                num_classes = sidecar["num_classes"]
            if num_classes is None:
                num_classes = n_embeds if pipeline_class == "ConsistencyModelPipeline" else (
                    n_embeds - 1)
            if not 0 < num_classes <= n_embeds:
                raise ValueError(
                    f"num_classes={num_classes} does not fit a UNet with {n_embeds} class "
                    f"embeddings")
            n_cls = int(num_classes)
            null_class = n_cls if n_embeds == n_cls + 1 else None
    else:
        vcfg = parts["vae_config"]
        vae_scale_factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
        # Flux's transformer reads 2x2-packed tokens: 4x the VAE's channels
        latent_channels = (int(vcfg["latent_channels"]) if kind == "flux"
                           else unet.config.in_channels)
        n_cls, null_class = None, None
    # Flux's transformer has no sample size: FluxPipeline's default_sample_size is 128 latents
    sample_size = 128 if kind == "flux" else unet.config.sample_size
    if kind == "flux":
        schedule.pipeline_sigmas = "flux"

    bb = Backbone(
        kind=kind,
        path=folder,
        pipeline_class=pipeline_class,
        unet=unet,
        vae=parts.get("vae"),
        vae_config=parts.get("vae_config"),
        text_encoder=parts.get("text_encoder"),
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer=parts.get("tokenizer"),
        tokenizer_2=parts.get("tokenizer_2"),
        text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=parts.get("tokenizer_3"),
        scheduler_config=sched_cfg,
        schedule=schedule,
        prediction_type=prediction_type,
        vae_scale_factor=vae_scale_factor,
        latent_channels=latent_channels,
        resolution=_square_size(sample_size) * vae_scale_factor,
        num_classes=n_cls,
        null_class=null_class,
        force_zeros_for_empty_prompt=parts.get("force_zeros_for_empty_prompt", False),
        max_sequence_length=sidecar.get("max_sequence_length"),
    )
    bb.set_resolution(bb.resolution)
    return bb


# ----------------------------------------------------------------------------- backbone


@dataclass
class Backbone:
    """A loaded teacher and its frozen surroundings (see the module docstring)."""

    kind: str  # "sd" | "sdxl" | "sd3" | "flux" | "pixel"
    path: Path
    unet: nn.Module  # the denoising network: a UNet, or SD3's transformer
    scheduler_config: dict
    schedule: NoiseSchedule
    prediction_type: str  # "epsilon" | "v_prediction" | "sample" | "cm"
    vae_scale_factor: int
    latent_channels: int
    resolution: int
    pipeline_class: str = ""
    vae: Optional[nn.Module] = None
    vae_config: Optional[dict] = None
    text_encoder: Optional[nn.Module] = None
    text_encoder_2: Optional[nn.Module] = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Optional[nn.Module] = None  # SD3's T5 (optional: zeros without it)
    tokenizer_3: Any = None
    num_classes: Optional[int] = None
    null_class: Optional[int] = None
    force_zeros_for_empty_prompt: bool = False
    #: SD3 / Flux: T5 tokens per prompt, or SD3's rows of zeros without T5 (None: the
    #: pipeline's default, 256 / 512; a folder's ``diffdistill.json`` may set it)
    max_sequence_length: Optional[int] = None
    #: most prompts kept by the in-memory embedding cache (least recently used dropped
    #: first); an SD1.5 entry is ~0.24 MB in fp32, SDXL ~0.3 MB in fp16. Call
    #: clear_prompt_cache() if the text encoders change.
    prompt_cache_size: int = 1024
    _prompt_cache: "OrderedDict[str, tuple]" = field(default_factory=OrderedDict, repr=False)
    #: optional on-disk layer under the in-memory cache (an ``EmbeddingCache``), shared
    #: across runs and methods; see :meth:`attach_prompt_disk_cache`.
    prompt_disk_cache: Any = field(default=None, repr=False)

    # -- networks -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, unet: Optional[nn.Module] = None, **kw) -> Denoiser:
        """The teacher as a :class:`Denoiser`, or ``unet`` with the teacher's schedule."""
        if self.prediction_type == "cm":
            kw.setdefault("sigma_data", self.scheduler_config.get("sigma_data", 0.5))
        prediction_type = kw.pop("prediction_type", None) or self.prediction_type
        return Denoiser(self.unet if unet is None else unet, self.schedule, prediction_type,
                        **kw)

    @property
    def ode_sampler(self) -> str:
        """The deterministic many-step sampler a teacher is measured with: flow Euler on a
        rectified flow (its scheduler's own grid), DDIM on a VP schedule."""
        return "flow_euler" if self.schedule.kind == "flow" else "ddim"

    def set_resolution(self, resolution: int) -> None:
        """Generate and train at ``resolution`` px. A flow model that shifts its timesteps by
        resolution (Flux's ``use_dynamic_shifting``) gets its μ from the latent token count,
        as its pipeline computes it: (H / VAE factor / patch)², the patch being 2 for Flux's
        packed latents and the transformer's ``patch_size`` for SD3."""
        self.resolution = int(resolution)
        if self.schedule.kind == "flow" and self.kind != "pixel":
            patch = 2 if self.kind == "flux" else int(getattr(self.unet.config, "patch_size", 1))
            side = self.resolution // self.vae_scale_factor // patch
            self.schedule.set_image_seq_len(side * side)

    def sampler_options(self, sampler: str) -> dict:
        """What the model's own scheduler config implies for the shared samplers: a pixel
        model whose scheduler sets ``clip_sample`` (DDPM / ADM pixel models clip x0̂ to
        [-1, 1] at every step, as the stock DDPM/DDIM schedulers then do) samples with
        ``clip_denoised`` on the samplers that have it. Latent models never clip."""
        if (self.kind == "pixel" and self.scheduler_config.get("clip_sample")
                and sampler in CLIPPING_SAMPLERS):
            return {"clip_denoised": True}
        return {}

    # -- text -----------------------------------------------------------------------
    def _require_text(self):
        if self.kind == "pixel":
            raise ValueError("a pixel backbone has no text encoder: use class_cond(labels)")
        if any(getattr(self, name) is None for name in TEXT_COMPONENTS[self.kind]):
            raise ValueError(
                "this backbone was loaded with load_text=False: reload with load_text=True "
                "to encode prompts")

    def _encode_uncached(self, prompts: list[str]) -> list[tuple]:
        """Per-prompt (hidden states [L, D], pooled [P] or None), as the stock pipelines do
        (:func:`diffdistill.text_encoders.encode_prompts_like_pipeline`)."""
        from .text_encoders import encode_prompts_like_pipeline

        hidden, pooled = encode_prompts_like_pipeline(self, prompts)
        if pooled is None:  # clones: cache entries own their memory
            return [(h.clone(), None) for h in hidden]
        return [(h.clone(), p.clone()) for h, p in zip(hidden, pooled)]

    def _embed(self, prompts: list[str]) -> tuple[Tensor, Optional[Tensor]]:
        cache = self._prompt_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        if missing and self.prompt_disk_cache is not None:
            missing = self._from_disk(missing)
        if missing:
            encoded = self._encode_uncached(missing)
            for p, v in zip(missing, encoded):
                cache[p] = v
            if self.prompt_disk_cache is not None:
                self._to_disk(missing, encoded)
        entries = [cache[p] for p in prompts]
        for p in prompts:
            cache.move_to_end(p)
        while len(cache) > self.prompt_cache_size:
            cache.popitem(last=False)
        hidden = torch.stack([e[0] for e in entries])
        pooled = torch.stack([e[1] for e in entries]) if entries[0][1] is not None else None
        return hidden, pooled

    def time_ids(self, batch: int, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, dtype=torch.float32) -> Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), per sample."""
        res = (self.resolution, self.resolution)
        ids = list(tuple(original_size or res) + tuple(crops_coords_top_left)
                   + tuple(target_size or res))
        cfg = self.unet.config
        expected = self.unet.add_embedding.linear_1.in_features
        passed = cfg.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if expected != passed:
            raise ValueError(
                f"the UNet expects an added embedding of {expected} features but time ids + "
                f"pooled text give {passed}: UNet and text_encoder_2 do not match")
        return torch.tensor([ids], dtype=dtype, device=self.device).repeat(batch, 1)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        with_uncond: bool = True,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
    ) -> Cond:
        """Prompt conditioning as the stock pipeline builds it, ``uncond`` = empty prompt."""
        self._require_text()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        hidden, pooled = self._embed(prompts)
        dev = self.device
        if self.kind in ("sd3", "flux"):  # their negative is the encoded empty prompt
            cond = Cond(encoder_hidden_states=hidden.to(dev), pooled_projections=pooled.to(dev))
            if with_uncond:
                uh, up = self._embed([""])
                cond.uncond = Cond(encoder_hidden_states=uh.repeat(len(prompts), 1, 1).to(dev),
                                   pooled_projections=up.repeat(len(prompts), 1).to(dev))
            return cond
        if self.kind == "sd":
            cond = Cond(encoder_hidden_states=hidden.to(dev))
            if with_uncond:
                u, _ = self._embed([""])
                cond.uncond = Cond(encoder_hidden_states=u.repeat(len(prompts), 1, 1).to(dev))
            return cond
        ids = self.time_ids(len(prompts), original_size, crops_coords_top_left, target_size,
                            dtype=hidden.dtype)
        cond = Cond(encoder_hidden_states=hidden.to(dev),
                    added_cond_kwargs={"text_embeds": pooled.to(dev), "time_ids": ids})
        if with_uncond:
            if self.force_zeros_for_empty_prompt:  # SDXL's default negative: zeros
                uh, up = torch.zeros_like(hidden), torch.zeros_like(pooled)
            else:
                uh, up = self._embed([""])
                uh, up = uh.repeat(len(prompts), 1, 1), up.repeat(len(prompts), 1)
            cond.uncond = Cond(encoder_hidden_states=uh.to(dev),
                               added_cond_kwargs={"text_embeds": up.to(dev),
                                                  "time_ids": ids.clone()})
        return cond

    def attach_prompt_disk_cache(self, cache_dir) -> None:
        """Keep prompt embeddings on disk too (safetensors shards), keyed by the prompt and
        the text encoders' identity, so a second run or another method skips the encoders.

        The identity is what the encoders *compute*: the bytes of two probe prompts' encodings
        (the empty prompt and one with letters and digits), so any change of the weights, the
        tokenizer, the sequence length or the dtype — at the same path — starts a new cache
        instead of serving stale embeddings. Attach after moving the encoders to their final
        dtype and device."""
        from .embedding_cache import EmbeddingCache, tensor_digest

        probes = [t for pair in self._encode_uncached(["", "a photo of a cat, 0123"])
                  for t in pair]
        digest = tensor_digest(probes, salt=self.kind)
        self.prompt_disk_cache = EmbeddingCache(cache_dir, f"prompts-{digest[:16]}")

    def vae_identity(self, resolution: int) -> str:
        """What the VAE encoder computes, as a digest: the posterior of one fixed probe image
        (a smooth pattern in [-1, 1] at ``resolution``) in the VAE's dtype — the latent
        cache's namespace, so a VAE replaced at the same path starts a new cache."""
        from .embedding_cache import tensor_digest

        self._require_vae()
        c = int(self.vae.config.in_channels)
        ramp = torch.linspace(-1.0, 1.0, resolution)
        probe = torch.stack([torch.outer(ramp, ramp.flip(0)) * (1 - 0.5 * i) for i in range(c)])
        with torch.no_grad():
            return tensor_digest([self.encode_moments(probe[None])], salt="vae")

    def _from_disk(self, prompts: list[str]) -> list[str]:
        """Fill the memory cache from disk; return the prompts still missing."""
        from .embedding_cache import hash_key

        still = []
        for p in prompts:
            key = hash_key(p)
            hidden = self.prompt_disk_cache.get(key + ".h")
            if hidden is None:
                still.append(p)
                continue
            pooled = (self.prompt_disk_cache.get(key + ".p")
                      if self.kind in ("sdxl", "sd3", "flux")
                      else None)
            dt = (self.text_encoder_2 or self.text_encoder).dtype
            self._prompt_cache[p] = (hidden.to(self.device, dt),
                                     None if pooled is None else pooled.to(self.device, dt))
        return still

    def _to_disk(self, prompts: list[str], encoded: list[tuple]) -> None:
        from .embedding_cache import hash_key

        for p, (hidden, pooled) in zip(prompts, encoded):
            key = hash_key(p)
            self.prompt_disk_cache.put(key + ".h", hidden.detach().cpu())
            if pooled is not None:
                self.prompt_disk_cache.put(key + ".p", pooled.detach().cpu())
        self.prompt_disk_cache.flush()

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    # -- classes --------------------------------------------------------------------
    def class_cond(self, labels, guidance: bool = True) -> Cond:
        """Class-label conditioning; ``uncond`` is the null class when ``guidance``."""
        if self.kind != "pixel" or self.num_classes is None:
            raise ValueError("class_cond needs a class-conditional pixel backbone "
                             f"(this one is kind={self.kind!r}, num_classes={self.num_classes})")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes})")
        cond = Cond(class_labels=labels)
        if guidance:
            if self.null_class is None:
                raise ValueError(
                    "this UNet has no null-class embedding, so classifier-free guidance is "
                    "impossible: call class_cond(labels, guidance=False)")
            cond.uncond = Cond(class_labels=torch.full_like(labels, self.null_class))
        return cond

    # -- images <-> latents ----------------------------------------------------------
    def _vae_affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(shift, scale) with latents = (z - shift) * scale, broadcast over channels."""
        cfg = self.vae.config
        scale = torch.tensor(float(cfg.scaling_factor), device=like.device)
        shift = torch.tensor(float(getattr(cfg, "shift_factor", None) or 0.0), device=like.device)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style per-channel statistics
            c = len(mean)
            shift = torch.tensor(mean, device=like.device).view(1, c, 1, 1)
            scale = scale / torch.tensor(std, device=like.device).view(1, c, 1, 1)
        return shift, scale

    def _require_vae(self):
        if self.vae is None:
            raise ValueError("this backbone was loaded with load_vae=False: reload with "
                             "load_vae=True to encode or decode images")

    def encode_moments(self, pixels: Tensor, chunk_size: int = 16) -> Tensor:
        """Images in [-1, 1] -> the VAE posterior (mean, std) stacked on channels: [B, 2C, h, w].

        This is what a latent cache stores: sampling from it later (with the trainer's
        generator) keeps the VAE's stochasticity without re-running the encoder.
        """
        self._require_vae()
        vae = self.vae
        outs = []
        for chunk in pixels.split(chunk_size):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            outs.append(torch.cat([dist.mean, dist.std], dim=1).float())
        return torch.cat(outs)

    def latents_from_moments(self, moments: Tensor, *, sample: bool = True,
                             generator=None) -> Tensor:
        """Model latents ``(z - shift) * scale`` with z ~ N(mean, std²) (or z = mean)."""
        mean, std = moments.float().chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=generator.device if generator is not None else mean.device)
            z = mean + std * noise.to(mean.device)
        shift, scale = self._vae_affine(z)
        return (z - shift) * scale

    def encode_images(self, pixels: Tensor, *, sample: bool = True, generator=None,
                      chunk_size: int = 16) -> Tensor:
        """Images in [-1, 1] -> model latents ``(z - shift) * scale`` (identity for pixels)."""
        if self.kind == "pixel":
            return pixels
        return self.latents_from_moments(self.encode_moments(pixels, chunk_size),
                                         sample=sample, generator=generator)

    def decode_latents(self, latents: Tensor, chunk_size: int = 16) -> Tensor:
        """Model latents -> images in [-1, 1] (float32; not clamped; identity for pixels)."""
        if self.kind == "pixel":
            return latents
        self._require_vae()
        vae = self.vae
        shift, scale = self._vae_affine(latents)
        z = latents.float() / scale + shift
        outs = [vae.decode(c.to(vae.device, vae.dtype)).sample.float()
                for c in z.split(chunk_size)]
        return torch.cat(outs)


#: samplers with a ``clip_denoised`` option (diffdistill.sampling)
CLIPPING_SAMPLERS = ("onestep", "lcm", "cm", "ddim")


def grid_shape(bb: "Backbone", resolution: int) -> tuple[int, int, int]:
    """The (C, H, W) a generator of ``bb`` samples at image ``resolution``: pixels for a pixel
    model, latents (``resolution`` / the VAE factor) otherwise."""
    if bb.kind == "pixel":
        return (bb.unet.config.in_channels, resolution, resolution)
    f = bb.vae_scale_factor
    return (bb.latent_channels, resolution // f, resolution // f)
