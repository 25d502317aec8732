"""Export a distilled generator so that it loads in stock diffusers (and in A1111 / ComfyUI).

Three artefacts, all safetensors:

* **diffusers LoRA** — :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with the
  pipeline class's own ``save_lora_weights``; ``pipe.load_lora_weights(dir,
  weight_name="pytorch_lora_weights.safetensors")`` reproduces the in-training adapter.
  A diffusers-format file carries no alpha, and a loader that finds none builds the LoRA
  with alpha = rank (scale 1). So the peft scale ``alpha / r`` is folded into the up
  matrices here: the file means the same thing to every loader, whatever alpha training used.
* **kohya LoRA** — :func:`save_lora_kohya` writes ``lora_kohya.safetensors`` with keys
  ``lora_unet_<module path, dots as underscores>.{lora_down.weight, lora_up.weight, alpha}``
  (scale = alpha / rank). Module paths follow what kohya-ss sd-scripts itself writes and
  what A1111 and ComfyUI read: SD1.x LoRAs use the diffusers module names
  (``lora_unet_down_blocks_0_attentions_0_...``); SDXL LoRAs use the original (sgm/LDM)
  UNet names (``lora_unet_input_blocks_1_1_...``), mapped by :func:`ldm_unet_module_name`.
  diffusers' ``load_lora_weights`` accepts both: it remaps sgm block numbers only for SDXL
  (it passes ``unet_config`` there, not for SD1.x), which is why SD1.x must not use LDM names.
  Its sgm remap assumes every up block with an upsampler also has attention (true of SDXL,
  whose attention-free up block is the last and has no upsampler); a UNet that breaks this
  loads such an upsampler LoRA in A1111/ComfyUI but not in diffusers.
* **full pipeline folder** — :func:`save_full_pipeline`: the student UNet (LoRA merged into a
  copy, never into the training UNet) plus the teacher's other components and the
  scheduler the generator is meant to be sampled with, loadable by
  ``DiffusionPipeline.from_pretrained(dir)``.

:func:`write_model_card` writes a README.md whose code block is produced by
:func:`usage_code`, the same function the tests execute, so the card's instructions run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .adapters import _has_adapters
from .backbone import SIDECAR, Backbone

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
SCHEDULERS = ("lcm", "tcd", "ddim", "euler", "cm", "teacher", "flow_stochastic")

_SCHEDULER_CLASSES = {
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "cm": "CMStochasticIterativeScheduler",
}
# Defaults of CMStochasticIterativeScheduler as used by Song et al. 2023 (sigma range of EDM).
CM_SCHEDULER_DEFAULTS = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0,
                             sigma_data=0.5, s_noise=1.0, rho=7.0, clip_denoised=True)


# ----------------------------------------------------------------------------- LoRA


def _lora_layers(unet: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in unet.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"the UNet carries no LoRA adapter named {adapter_name!r}")
    return layers


def _peft_lora_weights(unet: nn.Module, adapter_name: str) -> dict[str, tuple]:
    """module name -> (down [r, ...], up [..., r], scale) for one adapter, detached copies."""
    out = {}
    for name, m in _lora_layers(unet, adapter_name).items():
        out[name] = (m.lora_A[adapter_name].weight.detach().clone(),
                     m.lora_B[adapter_name].weight.detach().clone(),
                     float(m.scaling[adapter_name]))
    return out


def lora_state_dict(unet: nn.Module, adapter_name: str = "default",
                    dtype: Optional[torch.dtype] = None, *, peft_keys: bool = False
                    ) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' format, with the peft scale folded into the up weights
    (``peft_keys``: keep peft's ``lora_A`` / ``lora_B`` names, what SD3's loader reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    weights = _peft_lora_weights(unet, adapter_name)  # raises clearly when there is no LoRA
    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    for name, (_, _, scale) in weights.items():
        key = f"{name}.lora_B.weight"
        if scale != 1.0:
            sd[key] = sd[key] * scale
    sd = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous()
          for k, v in sd.items()}
    if peft_keys:
        return sd
    sd = convert_state_dict_to_diffusers(sd)
    # convert_state_dict_to_diffusers renames only attention keys (to_q.lora_A -> to_q.lora.down);
    # conv/ff keys keep peft's lora_A/lora_B. diffusers' loader (0.42) decides the format from
    # the FIRST key only, so such a mixed file silently drops one half on load. Make it uniform.
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
            for k, v in sd.items()}


def unet_kind(unet: nn.Module) -> str:
    """'sdxl' for a UNet with SDXL's text-time added conditioning, 'sd' for other
    ``UNet2DConditionModel``s, 'flux' for Flux's transformer, 'sd3' for an MMDiT, 'pixel'
    otherwise."""
    from .denoiser import is_flux, is_transformer

    if is_flux(unet):
        return "flux"
    if is_transformer(unet):
        return "sd3"
    cfg = unet.config
    if getattr(cfg, "cross_attention_dim", None) is None:
        return "pixel"
    return "sdxl" if getattr(cfg, "addition_embed_type", None) == "text_time" else "sd"


def _pipeline_class(kind: str):
    import diffusers

    if kind == "sd":
        return diffusers.StableDiffusionPipeline
    if kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline
    if kind == "sd3":
        return diffusers.StableDiffusion3Pipeline
    if kind == "flux":
        return diffusers.FluxPipeline
    raise ValueError(
        f"LoRA files are for latent text-to-image pipelines (kind 'sd' or 'sdxl'), not "
        f"{kind!r}: stock pixel pipelines have no LoRA loader; use save_full_pipeline")


def save_lora(unet: nn.Module, out_dir, kind: Optional[str] = None, *,
              adapter_name: str = "default", dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format) into ``out_dir``.

    ``kind`` ("sd" / "sdxl") picks the pipeline class that writes it; default: from the UNet.
    """
    kind = kind or unet_kind(unet)
    cls = _pipeline_class(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer = kind in ("sd3", "flux")
    layers = lora_state_dict(unet, adapter_name, dtype, peft_keys=transformer)
    # SD3's / Flux's loaders read peft-format keys under "transformer."; the UNet pipelines
    # "unet."
    key = "transformer_lora_layers" if transformer else "unet_lora_layers"
    cls.save_lora_weights(save_directory=str(out), **{key: layers},
                          weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return out / LORA_WEIGHT_NAME


_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0",
               "norm2": "out_layers.0", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
            "conv_out": "out.2"}


def ldm_unet_module_name(name: str, unet_config: Mapping[str, Any]) -> str:
    """Map a diffusers ``UNet2DConditionModel`` module path to the original LDM/sgm one.

    Layout of the original UNet: ``input_blocks[0]`` is conv_in; each down block contributes
    ``layers_per_block`` (resnet[, attention]) entries and then a downsampler entry;
    ``middle_block`` = resnet, attention, resnet; each up block contributes
    ``layers_per_block + 1`` entries, the upsampler riding on the last one.
    """
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("LDM names need one layers_per_block for all blocks")
    for k, v in _TOP_LDM.items():
        if name == k or name.startswith(k + "."):
            return v + name[len(k):]

    def resnet_rest(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_LDM.get(head, head) + ("." + tail if tail else "")

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, part, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.{rest.replace('conv', 'op', 1)}"
        idx = 1 + b * (lpb + 1) + i
        return (f"input_blocks.{idx}.0.{resnet_rest(rest)}" if part == "resnets"
                else f"input_blocks.{idx}.1.{rest}")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        part, i, rest = m[1], int(m[2]), m[3]
        return (f"middle_block.{2 * i}.{resnet_rest(rest)}" if part == "resnets"
                else f"middle_block.1.{rest}")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, part, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "upsamplers":
            has_attn = "Attn" in unet_config["up_block_types"][b]
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.{rest}"
        idx = b * (lpb + 1) + i
        return (f"output_blocks.{idx}.0.{resnet_rest(rest)}" if part == "resnets"
                else f"output_blocks.{idx}.1.{rest}")
    raise ValueError(f"no LDM name for UNet module {name!r}")


def kohya_state_dict(unet: nn.Module, *, naming: str = "diffusers", alpha: Optional[float] = None,
                     adapter_name: str = "default",
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """kohya-ss keys for the adapter; ``naming`` "diffusers" (SD1.x) or "ldm" (SDXL).

    ``alpha`` rescales the file: the up weights are multiplied so that ``alpha / rank``
    reproduces the trained scale (default: the trained alpha, weights unchanged).
    """
    if naming not in ("diffusers", "ldm"):
        raise ValueError(f"naming={naming!r} is unknown; use 'diffusers' or 'ldm'")
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in _peft_lora_weights(unet, adapter_name).items():
        rank = down.shape[0]
        module = ldm_unet_module_name(name, unet.config) if naming == "ldm" else name
        key = "lora_unet_" + module.replace(".", "_")
        file_alpha = scale * rank if alpha is None else float(alpha)
        up = up * (scale * rank / file_alpha)  # exact no-op when alpha is the trained one
        for suffix, t in (("lora_down.weight", down), ("lora_up.weight", up)):
            out[f"{key}.{suffix}"] = (t.to(dtype) if dtype is not None else t).contiguous()
        out[f"{key}.alpha"] = torch.tensor(file_alpha, dtype=dtype or torch.float32)
    return out


def save_lora_kohya(unet: nn.Module, out_dir, *, alpha: Optional[float] = None,
                    kind: Optional[str] = None, naming: str = "auto",
                    adapter_name: str = "default", dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``lora_kohya.safetensors`` for A1111 / ComfyUI (see the module docstring).

    ``naming="auto"``: diffusers module names for SD1.x, LDM names for SDXL (``kind``
    defaults to what the UNet is); ``alpha``: see :func:`kohya_state_dict`.
    """
    from safetensors.torch import save_file

    kind = kind or unet_kind(unet)
    _pipeline_class(kind)  # validates kind
    if naming == "auto":
        naming = "ldm" if kind == "sdxl" else "diffusers"
    sd = kohya_state_dict(unet, naming=naming, alpha=alpha, adapter_name=adapter_name,
                          dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version":
            "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1", "format": "pt"}
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    if len(ranks) == 1 and len(alphas) == 1:  # kohya's own summary fields, when uniform
        meta.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=f"{alphas.pop():g}")
    save_file(sd, str(out / KOHYA_WEIGHT_NAME), metadata=meta)
    return out / KOHYA_WEIGHT_NAME


# ----------------------------------------------------------------------------- full pipeline


def merged_unet(unet: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A plain copy of ``unet`` with any LoRA merged in; ``unet`` itself is not touched."""
    new = copy.deepcopy(unet)
    if dtype is not None:
        new.to(dtype)
    if _has_adapters(new):
        if hasattr(new, "fuse_lora"):
            new.fuse_lora()
            new.unload_lora()
        else:  # no diffusers PEFT mixin (UNet2DModel): merge the peft layers directly
            from diffusers.utils.peft_utils import recurse_remove_peft_layers
            from peft.tuners.tuners_utils import BaseTunerLayer

            for m in new.modules():
                if isinstance(m, BaseTunerLayer):
                    m.merge()
            recurse_remove_peft_layers(new)
    new.requires_grad_(False).eval()
    return new


def make_scheduler(name: str, teacher_config: Mapping[str, Any], **kwargs):
    """The stock scheduler ``name`` built from the teacher's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; use one of {SCHEDULERS}")
    cfg = dict(teacher_config)
    if name == "teacher":
        cls = getattr(diffusers, cfg.get("_class_name", "DDPMScheduler"))
        return cls.from_config(cfg, **kwargs)
    if name == "flow_stochastic":
        # a flow student's multistep sampler: x0̂ = x − σ v̂, re-noised as (1 − σ') x0̂ + σ' ε
        # (stochastic_sampling); shift 1 so the sigmas passed by the caller are used as given
        drop = ("use_dynamic_shifting", "shift", "stochastic_sampling", "_class_name")
        base = {k: v for k, v in cfg.items() if k not in drop}
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            base, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True, **kwargs)
    if name == "cm":
        base = dict(CM_SCHEDULER_DEFAULTS)
        if cfg.get("_class_name") == "CMStochasticIterativeScheduler":
            base.update({k: v for k, v in cfg.items() if not k.startswith("_")})
        base.update(kwargs)
        return diffusers.CMStochasticIterativeScheduler(**base)
    return getattr(diffusers, _SCHEDULER_CLASSES[name]).from_config(cfg, **kwargs)


def _load_missing(backbone: Backbone, name: str):
    """A component the backbone did not load (load_text/load_vae False), read from its folder."""
    from .model_folder import component_class, load_component

    index = json.loads((Path(backbone.path) / "model_index.json").read_text())
    entry = index[name]
    if name.startswith("tokenizer"):
        return component_class(entry, name).from_pretrained(str(Path(backbone.path) / name))
    return load_component(Path(backbone.path), entry, name, torch.float32, "cpu", None)


def save_full_pipeline(
    backbone: Backbone,
    unet: nn.Module,
    out_dir,
    *,
    scheduler: str = "lcm",
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write a complete pipeline folder with ``unet`` as its UNet (see the module docstring).

    SD → ``StableDiffusionPipeline`` (``LatentConsistencyModelPipeline`` when the UNet has a
    guidance embedding, ``time_cond_proj_dim``); SDXL → ``StableDiffusionXLPipeline``; pixel →
    ``ConsistencyModelPipeline`` for ``scheduler="cm"`` (the UNet must then be in that
    pipeline's consistency parameterisation), ``DDIMPipeline`` for "ddim", else
    ``DDPMPipeline``. ``dtype`` casts the saved UNet (default: as it is).

    ``scheduler="cm"`` on SD / SDXL writes the stock latent pipeline with
    ``CMStochasticIterativeScheduler`` (a latent consistency model in the CM
    parameterisation, e.g. from iCT): the stock pipelines call the scheduler's
    ``scale_model_input`` (c_in), its timesteps (250·log σ) and its ``step`` (the CM boundary
    condition), which is CM sampling; ``clip_denoised`` defaults to False there (latents
    are not in [-1, 1]).
    """
    import diffusers

    sched_kwargs = dict(scheduler_kwargs or {})
    if scheduler == "cm" and backbone.kind != "pixel":
        sched_kwargs.setdefault("clip_denoised", False)
    sched = make_scheduler(scheduler, backbone.scheduler_config, **sched_kwargs)
    student = merged_unet(unet, dtype=dtype)
    kind = backbone.kind
    if kind == "pixel":
        if scheduler == "cm":
            pipe = diffusers.ConsistencyModelPipeline(unet=student, scheduler=sched)
        elif scheduler == "euler":
            raise ValueError("DDPMPipeline does not scale model inputs, which Euler needs: use "
                             "scheduler 'ddim', 'lcm', 'tcd', 'teacher' or 'cm' for pixel models")
        elif scheduler == "ddim":
            pipe = diffusers.DDIMPipeline(unet=student, scheduler=sched)
        else:
            pipe = diffusers.DDPMPipeline(unet=student, scheduler=sched)
    else:
        from .backbone import TEXT_COMPONENTS

        parts = {}
        for name in ("vae", *TEXT_COMPONENTS[kind]):
            parts[name] = getattr(backbone, name) or _load_missing(backbone, name)
        if kind == "sd3":  # T5 only where the teacher has one (None: SD3 without T5)
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=student, scheduler=sched, text_encoder_3=backbone.text_encoder_3,
                tokenizer_3=backbone.tokenizer_3, **parts)
        elif kind == "flux":
            pipe = diffusers.FluxPipeline(transformer=student, scheduler=sched, **parts)
        elif kind == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(
                unet=student, scheduler=sched,
                force_zeros_for_empty_prompt=backbone.force_zeros_for_empty_prompt, **parts)
        else:
            lcm = (getattr(student.config, "time_cond_proj_dim", None) is not None
                   and scheduler != "cm")
            cls = (diffusers.LatentConsistencyModelPipeline if lcm
                   else diffusers.StableDiffusionPipeline)
            pipe = cls(unet=student, scheduler=sched, safety_checker=None,
                       feature_extractor=None, requires_safety_checker=False, **parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    drop_build_paths(out)
    if kind == "pixel" and backbone.num_classes is not None:
        (out / SIDECAR).write_text(json.dumps(
            {"num_classes": backbone.num_classes, "null_class": backbone.null_class}, indent=1))
    if backbone.max_sequence_length is not None:  # the teacher's text length travels along
        (out / SIDECAR).write_text(json.dumps(
            {"max_sequence_length": backbone.max_sequence_length}, indent=1))
    return out


def drop_build_paths(folder) -> list[Path]:
    """Remove ``_name_or_path`` (the folder a part was loaded from: a path of the machine that
    built it) from every ``config.json`` under ``folder``; returns the files changed. A shipped
    or shared pipeline folder should not carry the builder's directory layout."""
    changed = []
    for cfg in sorted(Path(folder).rglob("config.json")):
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed.append(cfg)
    return changed


# ----------------------------------------------------------------------------- model card


def _py(v) -> str:
    return json.dumps(v) if isinstance(v, str) else repr(v)


def usage_code(
    *,
    model_id: str,
    base_model: Optional[str],
    kind: str,
    lora: bool,
    scheduler: str,
    steps: int,
    guidance_scale: float,
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    call_kwargs: Optional[Mapping[str, Any]] = None,
    prompt: str = "a photo of a cat",
    class_label: int = 0,
) -> str:
    """The diffusers lines that load and sample an export (embedded verbatim in the card)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is unknown; use one of {SCHEDULERS}")
    if scheduler == "cm" and lora:
        raise ValueError("scheduler 'cm' is for exported full consistency-model pipelines only")
    call = dict(call_kwargs or {})
    if scheduler == "tcd" and kind != "pixel":
        # the stock SD pipelines pass eta=0.0 unless told, which overrides TCD's gamma
        call.setdefault("eta", 0.3)
    imports = ["DiffusionPipeline"]
    lines = [
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        "dtype = torch.float16 if device == \"cuda\" else torch.float32",
    ]
    if lora:
        if kind not in ("sd", "sdxl") or not base_model:
            raise ValueError("a LoRA card needs kind 'sd'/'sdxl' and the base model")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({_py(base_model)}, "
                     f"torch_dtype=dtype).to(device)")
        lines.append(f"pipe.load_lora_weights({_py(model_id)}, "
                     f"weight_name={_py(LORA_WEIGHT_NAME)})")
        if scheduler != "teacher":
            cls = _SCHEDULER_CLASSES[scheduler]
            imports.append(cls)
            extra = "".join(f", {k}={_py(v)}" for k, v in (scheduler_kwargs or {}).items())
            lines.append(f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config{extra})")
        lines.append("pipe.fuse_lora()  # optional: merge the LoRA for faster sampling")
    else:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({_py(model_id)}, "
                     f"torch_dtype=dtype).to(device)")
    args = "".join(f", {k}={_py(v)}" for k, v in call.items())
    if kind == "pixel":
        if scheduler == "cm":
            lines.append(f"image = pipe(class_labels=[{int(class_label)}], "
                         f"num_inference_steps={int(steps)}{args}).images[0]")
        else:
            lines.append(f"image = pipe(num_inference_steps={int(steps)}{args}).images[0]")
    else:
        lines.append(f"image = pipe({_py(prompt)}, num_inference_steps={int(steps)}, "
                     f"guidance_scale={float(guidance_scale)}{args}).images[0]")
    lines.append('image.save("sample.png")')
    head = ["import torch", f"from diffusers import {', '.join(imports)}", ""]
    return "\n".join(head + lines) + "\n"


def _looks_like_hub_id(s: Optional[str]) -> bool:
    return bool(s) and not os.path.exists(s) and re.match(
        r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", s) is not None


EXPORT_INFO = "diffdistill_export.json"  # how to sample an export; read by sample / bench


def save_generator(backbone, unet: nn.Module, out_dir, *, lora: bool, scheduler: str,
                   scheduler_kwargs: Optional[Mapping[str, Any]] = None,
                   adapter_name: str = "default") -> Path:
    """The one export path of every distilled generator: a LoRA (diffusers + kohya files)
    for ``lora``, else a full pipeline folder whose scheduler is ``scheduler``."""
    out = Path(out_dir)
    if lora:
        save_lora(unet, out, kind=backbone.kind, adapter_name=adapter_name)
        if backbone.kind in ("sd", "sdxl"):  # kohya's names are for UNets
            save_lora_kohya(unet, out, kind=backbone.kind, adapter_name=adapter_name)
    else:
        save_full_pipeline(backbone, unet, out, scheduler=scheduler,
                           scheduler_kwargs=scheduler_kwargs)
    return out


# The sampler each stock scheduler class implies (``--sampler auto``).
SAMPLER_FOR_SCHEDULER = {
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "CMStochasticIterativeScheduler": "lcm",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "FlowMatchLCMScheduler": "lcm",
}


def choose_sampler(requested: str, model_dir: Path, lora_dir: Optional[Path],
                   scheduler_cls: str):
    """``auto``: the export's recorded sampler (and its :data:`EXPORT_INFO`), else the one
    its scheduler class implies."""
    if requested != "auto":
        return requested, {}
    for d in (lora_dir, model_dir):
        if d is not None and (d / EXPORT_INFO).exists():
            info = json.loads((d / EXPORT_INFO).read_text())
            return info.get("sampler", "lcm"), info
    return SAMPLER_FOR_SCHEDULER.get(scheduler_cls, "ddim"), {}


def load_lora_into(unet, lora_dir: Path) -> None:
    """Load a diffusers-format LoRA (``unet.`` keys) into ``unet``; fail clearly on mismatch
    (a :class:`~diffdistill.config.ConfigError`: the command prints it and exits 2)."""
    from diffdistill.config import ConfigError

    if not (lora_dir / LORA_WEIGHT_NAME).exists():
        raise FileNotFoundError(f"--lora {lora_dir}: no {LORA_WEIGHT_NAME} in that folder")
    prefix = "transformer" if unet_kind(unet) in ("sd3", "flux") else "unet"
    try:
        unet.load_lora_adapter(str(lora_dir), weight_name=LORA_WEIGHT_NAME, prefix=prefix,
                               adapter_name="default")
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"--lora {lora_dir} does not fit this base model (shape or key "
                          f"mismatch: {str(e).splitlines()[0][:300]}); was it trained on a "
                          "different base?") from None


def write_export_info(out_dir, *, sampler: str, steps: int, guidance_scale: float,
                      timesteps, **extra: Any) -> Path:
    """``diffdistill_export.json``: the sampler, step count, guidance and timestep grid an
    export is meant to be sampled with (``diffdistill sample`` / ``bench`` read it)."""
    info = {"sampler": sampler, "steps": int(steps), "guidance_scale": float(guidance_scale),
            "timesteps": [int(t) if float(t).is_integer() else float(t) for t in timesteps],
            **extra}
    path = Path(out_dir) / EXPORT_INFO
    path.write_text(json.dumps(info, indent=1))
    return path


def flow_usage_code(backbone, *, model_id: str, base_model: str, lora: bool, sigmas,
                    prompt: str) -> str:
    """The model card's code for a flow student (SD3 or Flux class): the stock pipeline with
    ``FlowMatchEulerDiscreteScheduler`` at shift 1, no dynamic shift, with stochastic sampling
    (x0̂ = x − σ v̂, re-noised along the flow path: the toolkit's multistep consistency
    sampler), called with the student's own ``sigmas``. An SD3 folder without T5 must say so
    to the stock ``from_pretrained`` (``text_encoder_3=None, tokenizer_3=None``). The guidance
    scale is 1: no CFG, and for a guidance-distilled Flux student the embedded scale its
    generator was trained with (:meth:`~diffdistill.denoiser.Denoiser._flux_call`)."""
    cls = "FluxPipeline" if backbone.kind == "flux" else "StableDiffusion3Pipeline"
    extra = ("" if backbone.kind == "flux" or backbone.text_encoder_3 is not None
             else ", text_encoder_3=None, tokenizer_3=None")
    load = (f"pipe = {cls}.from_pretrained({base_model!r}{extra})\n"
            f"pipe.load_lora_weights({model_id!r})\n" if lora else
            f"pipe = {cls}.from_pretrained({model_id!r}{extra})\n")
    length = ("" if backbone.max_sequence_length is None
              else f", max_sequence_length={backbone.max_sequence_length}")
    return ("import torch\n"
            f"from diffusers import FlowMatchEulerDiscreteScheduler, {cls}\n"
            + load +
            "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(\n"
            "    pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False,\n"
            "    stochastic_sampling=True)\n"
            f"image = pipe({prompt!r}, sigmas={list(sigmas)}, "
            f"guidance_scale=1.0{length}).images[0]\n"
            "image.save(\"sample.png\")\n")


def write_model_card(
    out_dir,
    *,
    method: str,
    base_model: str,
    steps: int,
    guidance_scale: float,
    scheduler: str,
    lora: bool,
    kind: str,
    extra: Optional[Mapping[str, Any]] = None,
    model_id: Optional[str] = None,
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    call_kwargs: Optional[Mapping[str, Any]] = None,
    prompt: str = "a photo of a cat",
    code: Optional[str] = None,
) -> Path:
    """README.md with YAML front matter and the exact diffusers code to load and sample.

    ``model_id`` is how readers refer to this folder (a hub id once uploaded); default: the
    folder's path. ``extra`` adds rows to the training-details table. ``code`` replaces the
    generated :func:`usage_code` block (for exports no stock pipeline call can sample, e.g.
    class-conditional pixel UNets driven by a scheduler loop).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_id = model_id or str(out)
    if code is None:
        code = usage_code(model_id=model_id, base_model=base_model, kind=kind, lora=lora,
                          scheduler=scheduler, steps=steps, guidance_scale=guidance_scale,
                          scheduler_kwargs=scheduler_kwargs, call_kwargs=call_kwargs,
                          prompt=prompt)
    family = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "pixel": "pixel-space"}
    tags = ["diffusers", "diffdistill", method, family.get(kind, kind),
            "text-to-image" if kind != "pixel" else "class-conditional"]
    if lora:
        tags.append("lora")
    front = ["---", "library_name: diffusers"]
    if _looks_like_hub_id(base_model):  # the hub only accepts repo ids here
        front.append(f"base_model: {base_model}")
    front.append(f"pipeline_tag: {'text-to-image' if kind != 'pixel' else 'unconditional-image-generation'}")
    front.append("tags:")
    front += [f"- {t}" for t in dict.fromkeys(tags)]
    front.append("---")
    what = "LoRA" if lora else "pipeline"
    if lora:
        fmt = "diffusers LoRA (`pytorch_lora_weights.safetensors`)"
        if (out / KOHYA_WEIGHT_NAME).is_file():
            fmt += "; the same LoRA for A1111 / ComfyUI in kohya naming (`lora_kohya.safetensors`)"
    else:
        fmt = "full diffusers pipeline folder (safetensors)"
    rows = {"method": method, "base model": base_model, "sampling steps": steps,
            "guidance scale": guidance_scale, "scheduler": scheduler, "format": fmt}
    rows.update(dict(extra or {}))
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()]
    body = textwrap.dedent(f"""
        # {method} {what} distilled from `{base_model}`

        A {steps}-step generator distilled with diffdistill ({method}).
        It is sampled with the `{scheduler}` scheduler at guidance scale {guidance_scale}.

        ## Use with diffusers

        ```python
        """).lstrip("\n")
    text = "\n".join(front) + "\n\n" + body + code + "```\n\n## Training details\n\n" + \
        "\n".join(table) + "\n"
    (out / "README.md").write_text(text)
    return out / "README.md"


def card_code(readme_path) -> str:
    """The first ```python block of a model card (what the tests execute)."""
    text = Path(readme_path).read_text()
    m = re.search(r"```python\n(.*?)```", text, re.S)
    if not m:
        raise ValueError(f"{readme_path} has no python code block")
    return m.group(1)
