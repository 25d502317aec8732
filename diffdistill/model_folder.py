"""Model folders: what a local diffusers folder holds, checked and loaded part by part.

The toolkit never downloads: every path is a local folder (``HF_HUB_OFFLINE`` semantics).
:func:`validate_model_folder` answers "is this a folder the toolkit can load, and which
pipeline is it" with one line when it is not (a hub id, a LoRA export, a file);
:func:`folder_kind` names the backbone kind without loading anything; :func:`load_component`
loads one weight component with the class ``model_index.json`` names (safetensors whenever
present), so a run loads only the parts it needs.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

#: pipeline class -> backbone kind
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "ConsistencyModelPipeline": "pixel",
}
#: the denoising network's component name per kind (``Backbone.unet`` holds it either way)
NETWORK_COMPONENT = {"sd3": "transformer", "flux": "transformer"}
#: the kinds whose network is a rectified-flow transformer (SD3's MMDiT, Flux's)
FLOW_TRANSFORMER_KINDS = ("sd3", "flux")
#: the text components each latent kind needs (SD3's T5, text_encoder_3, is optional; Flux's
#: text_encoder_2 is its T5 and required)
TEXT_COMPONENTS = {"sd": ("text_encoder", "tokenizer"),
                   "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                   "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                   "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
#: the side file in which exported folders record facts their configs cannot hold
SIDECAR = "diffdistill.json"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def supported_pipelines() -> str:
    return ", ".join(sorted(PIPELINE_KINDS))


def validate_model_folder(path) -> tuple[Path, Optional[dict]]:
    """(folder, model_index or None for a bare UNet2DModel folder), or raise one line saying
    what to pass instead (FileNotFoundError / NotADirectoryError / ValueError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_backbone expects a folder path, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        s = str(path)
        if _HUB_ID.match(s) and not s.startswith((".", "~")):
            raise FileNotFoundError(
                f"{s!r} is not a local folder; it looks like a Hugging Face hub id. This "
                f"toolkit never downloads; fetch it once (e.g. `hf download {s} --local-dir "
                f"DIR`) and pass DIR."
            )
        raise FileNotFoundError(
            f"model path {s!r} does not exist: pass a local diffusers pipeline folder (the "
            f"directory holding model_index.json, as written by `save_pretrained`) of one of: "
            f"{supported_pipelines()}"
        )
    if not p.is_dir():
        raise NotADirectoryError(
            f"{str(p)!r} is a file, not a diffusers pipeline folder: pass the directory that "
            f"holds model_index.json"
        )
    index = p / "model_index.json"
    if index.is_file():
        return p, json.loads(index.read_text())
    cfg = p / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel":
        if bare_scheduler_config_path(p) is None:
            raise FileNotFoundError(
                f"{str(p)!r} holds a UNet2DModel but no scheduler config (scheduler_config.json "
                f"or scheduler/scheduler_config.json): the noise schedule cannot be known"
            )
        return p, None
    if (p / "pytorch_lora_weights.safetensors").is_file():  # export.LORA_WEIGHT_NAME
        raise ValueError(
            f"{str(p)!r} is a LoRA export, not a model: load its base model (named in its "
            f"README.md) and the LoRA from this folder (bench: path: BASE, lora: {str(p)})"
        )
    raise ValueError(
        f"{str(p)!r} is not a diffusers pipeline folder (no model_index.json, and not a "
        f"UNet2DModel folder with config.json + scheduler_config.json)"
    )


def folder_kind(path) -> str:
    """The backbone kind a model folder holds (``sd``, ``sdxl``, ``sd3``, ``pixel``) from its
    model_index.json alone, without loading anything."""
    _, index = validate_model_folder(path)
    return "pixel" if index is None else PIPELINE_KINDS.get(index.get("_class_name", ""), "")


def bare_scheduler_config_path(p: Path) -> Optional[Path]:
    for cand in (p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    return None


def component_class(entry: Sequence[Optional[str]], name: str):
    library, cls_name = entry
    if library not in ("diffusers", "transformers"):
        raise ValueError(
            f"component {name!r} comes from library {library!r}; only diffusers and "
            f"transformers components are loaded"
        )
    module = importlib.import_module(library)
    try:
        return getattr(module, cls_name)
    except AttributeError as e:
        raise ValueError(f"component {name!r}: {library} has no class {cls_name!r}") from e


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def load_component(folder: Path, entry, name: str, dtype, device, variant):
    """Load one weight component with its own class; safetensors whenever present."""
    cls = component_class(entry, name)
    sub = folder / name
    if not sub.is_dir():
        raise FileNotFoundError(f"{str(folder)!r}: component folder {name!r} is missing")
    kw: dict[str, Any] = {}
    if _has_safetensors(sub):
        kw["use_safetensors"] = True
    if variant is not None:
        kw["variant"] = variant
    try:
        if entry[0] == "diffusers":
            model = cls.from_pretrained(str(sub), torch_dtype=dtype, **kw)
        else:  # transformers: cast after loading (its dtype keyword changed name across majors)
            model = cls.from_pretrained(str(sub), **kw).to(dtype)
    except Exception as e:  # a truncated / corrupt weight file or config: one line, not 16 frames
        from .config import ConfigError

        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{sub}: its {name} cannot be loaded ({type(e).__name__}: {first}); "
                          "the model folder is damaged or incomplete: copy or export it "
                          "again") from None
    return model.to(device).eval().requires_grad_(False)
