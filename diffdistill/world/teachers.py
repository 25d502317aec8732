"""The world's teachers before and after pretraining: fresh pipeline folders to train
(``init_teacher_pixel`` / ``init_teacher_latent`` / ``init_teacher_flow``), the shipped fp16
folder with its README (``finalize_teacher``) and the network's GFLOPs per call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffdistill.model_folder import SIDECAR

from . import cast_safetensors_fp16, fresh_tmp, replace_dir

#: CLIP tokens per caption of the flow teacher (its captions need at most 34)
FLOW_TEXT_TOKENS = 40


def init_teacher_pixel(folder: Path, seed: int, unet: dict) -> Path:
    """A freshly initialised class-conditional ``DDPMPipeline`` folder (10 classes + null)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffdistill.tiny import tiny_pixel_unet

    model = tiny_pixel_unet(channels=unet["channels"], num_classes=10, sample_size=32,
                            seed=seed, down_block_types=unet["down_block_types"],
                            up_block_types=unet["up_block_types"],
                            layers_per_block=unet["layers_per_block"],
                            norm_groups=unet["norm_groups"])
    # DDPM's CIFAR-10 schedule (Ho et al. 2020): 1000 steps, linear β 1e-4 → 0.02 (the
    # pretraining config's pretrain.target turns the ε head into v). No x0̂ clipping, unlike
    # google/ddpm-cifar10-32: DDIMScheduler's clip_sample clamps x0̂ but keeps ε̂, so each step
    # lands off the model's trajectory, and Fashion-MNIST's background sits at the clamp (-1):
    # the v teacher at 50 DDIM steps measured FID-FMNIST 14.4 clipped vs 3.1 not (500 samples;
    # docs/one_step.md, "Clipping").
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                          beta_end=0.02, prediction_type="epsilon", clip_sample=False)
    tmp = fresh_tmp(folder)
    DDPMPipeline(unet=model, scheduler=sched).save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "diffdistill.json").write_text(json.dumps({"num_classes": 10, "null_class": 10}))
    replace_dir(tmp, folder)
    return folder


def init_teacher_latent(folder: Path, seed: int, vae_dir: Path, unet: dict,
                        text_encoder: dict) -> Path:
    """A freshly initialised ``StableDiffusionPipeline`` folder around the trained VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from diffdistill.tiny import SD_SCHEDULER, tiny_cond_unet, tiny_text_encoder
    from diffdistill.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    te = tiny_text_encoder(hidden=text_encoder["hidden"], layers=text_encoder["layers"],
                           seed=seed)
    model = tiny_cond_unet(channels=unet["channels"], cross_attention_dim=te.config.hidden_size,
                           sample_size=32 // factor, seed=seed,
                           down_block_types=unet["down_block_types"],
                           up_block_types=unet["up_block_types"],
                           layers_per_block=unet["layers_per_block"])
    tmp = fresh_tmp(folder)
    tok = load_clip_tokenizer(write_clip_tokenizer(tmp.parent / f".{folder.name}.tokenizer"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=model,
        scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type="epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp.parent / f".{folder.name}.tokenizer", ignore_errors=True)
    replace_dir(tmp, folder)
    return folder


#: the flow teacher's FlowMatchEulerDiscreteScheduler: no shift. SD3 shifts by 3 at 1024 px
#: (Esser et al. 2024, Sec. 5.3.2: the shift grows with the square root of the pixel count
#: over 256²); at 32 px that rule gives less than 1, so the world uses none.
FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)


def init_teacher_flow(folder: Path, seed: int, vae_dir: Path, transformer: dict,
                      text_encoder: dict) -> Path:
    """A freshly initialised ``StableDiffusion3Pipeline`` folder without T5: an MMDiT on the
    world VAE's 8×8×4 latents, two frozen random ``CLIPTextModelWithProjection`` encoders
    (their hidden states concatenated fill the joint attention width) on a character-level
    CLIP tokenizer (514 ids: the two text encoders cost ~0.1 MB instead of 6 MB with CLIP's
    49,408-id vocabulary), and the flow-matching Euler scheduler.

    Text length: the joint attention runs every text token through every block, so SD3's
    77 CLIP tokens + 256 rows of T5 zeros beside 16 image tokens made 95 % of the compute
    text. The world's captions are at most 34 characters-tokens long: the tokenizer pads to
    :data:`FLOW_TEXT_TOKENS` and the folder's ``diffdistill.json`` sets
    ``max_sequence_length`` to 0 (no T5 rows; the stock pipeline takes the same argument)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from diffdistill.tiny import tiny_text_encoder
    from diffdistill.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32)
    if vae.config.shift_factor is None:  # the SD3 pipeline adds it unconditionally
        vae.register_to_config(shift_factor=0.0)
    latent = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    tmp = fresh_tmp(folder)
    tok_dir = write_clip_tokenizer(tmp.parent / f".{folder.name}.tokenizer", merges=0,
                                   model_max_length=FLOW_TEXT_TOKENS)
    tok = load_clip_tokenizer(tok_dir)
    hidden = text_encoder["hidden"]
    encoders = [tiny_text_encoder(hidden=hidden, layers=text_encoder["layers"],
                                  with_projection=True, projection_dim=hidden,
                                  vocab_size=len(tok), seed=seed + k,
                                  max_positions=FLOW_TEXT_TOKENS) for k in (0, 1)]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=transformer["layers"],
        attention_head_dim=transformer["head_dim"], num_attention_heads=transformer["heads"],
        joint_attention_dim=2 * hidden, caption_projection_dim=transformer["head_dim"]
        * transformer["heads"], pooled_projection_dim=2 * hidden, pos_embed_max_size=latent)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER), vae=vae,
        text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / SIDECAR).write_text(json.dumps({"max_sequence_length": 0}))
    shutil.rmtree(tok_dir, ignore_errors=True)
    replace_dir(tmp, folder)
    return folder


def teacher_readme(stage: str, metrics: dict) -> str:
    if stage == "teacher_latent":
        body = (
            "Teacher A of diffdistill's embedded world: a text-to-image StableDiffusionPipeline "
            "trained on Fashion-MNIST captions (\"a photo of a sneaker\").\n\n"
            "```python\nfrom diffusers import StableDiffusionPipeline\n"
            "pipe = StableDiffusionPipeline.from_pretrained(PATH)\n"
            "image = pipe(\"a photo of a sneaker\", height=32, width=32, num_inference_steps=25,\n"
            "             guidance_scale=2.0).images[0]\n```\n\n"
            "(`world.json` records FID-FMNIST per guidance scale and the best one.) "
            "The text encoder is randomly initialised and frozen (only the UNet and the VAE "
            "were trained).\n")
    elif stage == "teacher_flow":
        body = (
            "Teacher C of diffdistill's embedded world: a rectified-flow StableDiffusion3Pipeline "
            "(MMDiT on the world VAE's 8x8x4 latents, two CLIP text encoders on a "
            "character-level tokenizer, no T5) trained by flow matching on Fashion-MNIST "
            "captions.\n\n"
            "```python\nfrom diffusers import StableDiffusion3Pipeline\n"
            "pipe = StableDiffusion3Pipeline.from_pretrained(PATH, text_encoder_3=None, "
            "tokenizer_3=None)\n"
            "image = pipe(\"a photo of a sneaker\", height=32, width=32, num_inference_steps=25,\n"
            "             guidance_scale=3.0, max_sequence_length=0).images[0]\n```\n\n"
            "`max_sequence_length=0`: it was trained without SD3's 256 rows of T5 zeros (the "
            "text is its 40 CLIP tokens; `diffdistill.json` records it).\n\n"
            "The text encoders are randomly initialised and frozen (only the transformer was "
            "trained; the VAE is the latent teacher's).\n")
    else:
        body = (
            "Teacher B of diffdistill's embedded world: a class-conditional pixel UNet2DModel "
            "(32x32 px, 10 Fashion-MNIST classes + null class 10 for classifier-free "
            "guidance) with a DDPM linear schedule. Stock DDPMPipeline passes no class "
            "labels, so sample it with diffdistill (`diffdistill sample PATH --class-label 7 "
            "--sampler ddim --steps 25`) or call the UNet with `class_labels=`.\n")
    return (f"# {stage}\n\n{body}\nWeights are fp16 safetensors; load in fp32. Built by "
            f"`diffdistill world build` (see world.json for seeds, steps and metrics).\n")


def finalize_teacher(export_dir: Path, final: Path, stage: str, metrics: dict) -> Path:
    """Copy a trainer export into the assets: fp16 weights, the compact tokenizer
    (vocab.json + merges.txt instead of a 3.6 MB tokenizer.json), a short README."""
    from diffdistill.tokenizer import write_clip_tokenizer

    tmp = fresh_tmp(final)
    shutil.copytree(export_dir, tmp)
    cast_safetensors_fp16(tmp)
    if stage == "teacher_latent" and (tmp / "tokenizer").is_dir():
        shutil.rmtree(tmp / "tokenizer")
        write_clip_tokenizer(tmp / "tokenizer")
    (tmp / "README.md").write_text(teacher_readme(stage, metrics))
    replace_dir(tmp, final)
    return final


@torch.no_grad()


def unet_gflops(bb, unet) -> float:
    """Forward GFLOPs of one UNet call on one sample (multiply-adds count 2), with the
    conditioning the teacher uses: what every sampling step and training step pays."""
    from torch.utils.flop_counter import FlopCounterMode

    f = bb.vae_scale_factor
    x = torch.zeros(1, bb.latent_channels, 32 // f, 32 // f)
    cond = (bb.class_cond(torch.tensor([0]), guidance=False) if bb.kind == "pixel"
            else bb.encode_prompts(["a photo of a coat"], with_uncond=False))
    model = bb.denoiser(unet)
    with FlopCounterMode(display=False) as counter:
        model.raw(x, torch.tensor([500.0]), cond)
    return round(counter.get_total_flops() / 1e9, 4)
