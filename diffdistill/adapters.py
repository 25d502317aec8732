"""Making a UNet a student: LoRA or full training (:func:`make_trainable`), running it with its
adapters off (the teacher pass of a LoRA student), copies for fake scores / EMAs, and the
attention kernel. LoRA targets follow LCM-LoRA (Luo et al. 2023): attention projections,
plus the convolutional / projection layers with ``conv`` and the feed-forward with ``ff``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The convolutional / projection layers LCM-LoRA (Luo et al. 2023) adapts as well.
CONV_TARGETS = (
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
    "proj_in", "proj_out", "time_emb_proj",
)
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")
# An MMDiT's text stream (SD3 joint attention): its projections, as diffusers' SD3 LoRA
# script adapts them beside the image stream's to_q / to_k / to_v / to_out.0.
JOINT_ATTENTION_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _has_adapters(unet: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def lora_target_modules(targets: Iterable[str] = ATTENTION_TARGETS, *, conv: bool = False,
                        ff: bool = False, joint: bool = False) -> list[str]:
    """``targets`` plus :data:`CONV_TARGETS` (``conv``), :data:`FF_TARGETS` (``ff``) and the
    text stream of joint attention, :data:`JOINT_ATTENTION_TARGETS` (``joint``: an MMDiT)."""
    out = list(dict.fromkeys(targets))
    if joint:
        out += [t for t in JOINT_ATTENTION_TARGETS if t not in out]
    if conv:
        out += [t for t in CONV_TARGETS if t not in out]
    if ff:
        out += [t for t in FF_TARGETS if t not in out]
    return out


def make_trainable(
    unet: nn.Module,
    *,
    adapter: str = "lora",
    rank: int = 64,
    alpha: Optional[float] = None,  # default = rank, i.e. LoRA scale 1
    target_modules: Sequence[str] = ATTENTION_TARGETS,
    conv: bool = False,
    ff: bool = False,
    init="gaussian",
    frozen_dtype: Optional[torch.dtype] = None,
    gradient_checkpointing: bool = False,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Make ``unet`` a student in place and return its trainable parameters.

    ``adapter="lora"``: the base is frozen (cast to ``frozen_dtype`` if given) and a peft
    LoRA of ``rank``/``alpha`` is added on ``target_modules`` (+ :data:`CONV_TARGETS` with
    ``conv``, + :data:`FF_TARGETS` with ``ff``); the LoRA parameters are kept in float32.
    ``adapter="full"``: every parameter is trained, in float32 (``frozen_dtype`` unused).
    """
    if adapter not in ("lora", "full"):
        raise ValueError(f"adapter={adapter!r} is unknown; use 'lora' or 'full'")
    if adapter == "full":
        unet.to(torch.float32).requires_grad_(True)
    else:
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
        from peft import LoraConfig

        unet.requires_grad_(False)
        if frozen_dtype is not None:
            unet.to(frozen_dtype)
        from .denoiser import is_transformer

        targets = lora_target_modules(target_modules, conv=conv, ff=ff,
                                      joint=is_transformer(unet))
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            init_lora_weights=True if init == "default" else init,
            target_modules=targets,
        )
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config, adapter_name=adapter_name)
        else:  # no diffusers PEFT mixin (UNet2DModel): inject with peft itself
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters: none of {list(target_modules)} matched")
    return params


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Run ``unet`` without its LoRA inside the block (the teacher pass of a LoRA student)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            "this UNet carries no LoRA adapters, so disabling them would leave the student "
            "in place of the teacher: keep a separate teacher UNet (e.g. clone_unet) instead")
    was_disabled = all(m.disable_adapters for m in layers)
    # Switch the peft layers found above, which is all diffusers' ``disable_adapters()`` /
    # ``enable_adapters()`` do (each after its own walk over every module: one walk here).
    for m in layers:
        m.enable_adapters(False)
    try:
        yield unet
    finally:
        if not was_disabled:
            for m in layers:
                m.enable_adapters(True)


def set_attention_backend(unet: nn.Module, backend: str = "auto") -> str:
    """Choose the attention kernel: xformers (CUDA only) or PyTorch SDPA; returns the choice."""
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"attention backend {backend!r} is unknown; use auto, sdpa or xformers")
    device = next(unet.parameters()).device
    has_xformers = importlib.util.find_spec("xformers") is not None
    from .denoiser import is_transformer

    if is_transformer(unet):  # SD3's joint attention: its own processors are already SDPA
        if backend == "xformers":
            raise ValueError("attention backend 'xformers' is for UNets; SD3-class transformers "
                             "run PyTorch SDPA (model.attention: sdpa or auto)")
        return "sdpa"
    if backend == "auto":
        backend = "xformers" if (device.type == "cuda" and has_xformers) else "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise ValueError(
                f"xformers attention runs on CUDA only and this UNet is on {device}: use "
                f"backend='sdpa' (or 'auto')")
        if not has_xformers:
            raise ImportError("backend='xformers' needs the xformers package (the 'gpu' extra)")
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    # Per module: UNet2DModel has no set_attn_processor in every diffusers version.
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    return "sdpa"


def clone_unet(unet: nn.Module, dtype: Optional[torch.dtype] = None, *,
               drop_adapters: bool = False, requires_grad: Optional[bool] = None) -> nn.Module:
    """A deep copy of ``unet`` (for a fake score or an EMA), optionally cast to ``dtype``.

    ``drop_adapters`` removes LoRA layers from the copy without merging them (the copy is
    then the frozen base, i.e. the teacher); ``requires_grad`` sets every parameter's flag.
    """
    new = copy.deepcopy(unet)
    if drop_adapters and _has_adapters(new):
        new.unload_lora()
    if dtype is not None:
        new.to(dtype)
    if requires_grad is not None:
        new.requires_grad_(requires_grad)
    return new
