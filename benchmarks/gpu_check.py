"""One-shot GPU check: training speed, memory and MFU of the real trainers on real-size models.

Runs offline on one H100/H200-class GPU (``benchmarks/gpu_check.sh`` is the one command to
use there; on an H200 on 2026-11-28 the whole check took 184 s with its two launches failing
early, and a launch that runs takes about 50 s), or on CPU with tiny models (``--tiny``; what
the test suite runs). Weights are random: speed and memory do not depend on their values.

Stages (each wrapped: a failure is recorded with its traceback tail and the script goes on):

* ``build_models`` — an SD1.5-architecture pipeline (UNet2DConditionModel, AutoencoderKL,
  CLIP-L-size CLIPTextModel), an SDXL-architecture pipeline (UNet + two text encoders) and
  an SD3-medium-architecture pipeline (2B MMDiT, 16-channel VAE, CLIP-L + CLIP-G, no T5),
  built from the configs below and saved as stock diffusers folders in a temporary folder;
  ``--tiny``: ``diffdistill.tiny``'s pipelines.
* ``fsdp_launch``, ``zero2_launch`` — ``accelerate launch --config_file
  configs/accelerate/{fsdp,deepspeed_zero2}.yaml --num_processes 1 -m diffdistill.train CFG``
  for one step with full weights and the export: DMD2 under FSDP (plus DMD2 without
  its GAN term and pretraining, ``fsdp_launch_*``), LCD under ZeRO-2 (skipped without CUDA; ``zero2_launch`` is skipped,
  saying which files to add to ./wheels, when deepspeed is not installed). They run
  first, in fresh processes on an empty GPU.
* ``train_*`` — the project's trainers, built with ``build_config(cls.config_class, ...)``
  pointing ``model.path`` at those folders (Fashion-MNIST data resized to the resolution;
  ``$DIFFDISTILL_FMNIST`` names its IDX folder on a machine without Debian's package),
  ``setup()`` then ``train_step(batch)`` for warm-up + measured steps: LCD-LoRA, DMD2-LoRA,
  DMD2-full and f-distill at 512 px on SD1.5, LCD-LoRA at 1024 px on SDXL and DMD2-LoRA
  (GAN head on the MMDiT) at 1024 px on SD3, both with gradient checkpointing (``--tiny``:
  32 px, fp32; ``--compile``: ``train.compile=true``). Reported: it/s, s/step, peak memory (CUDA:
  ``max_memory_allocated``; CPU: peak-RSS growth, labelled), FLOPs of one step
  (``torch.utils.flop_counter.FlopCounterMode``) and MFU against the GPU's dense bf16 peak.
* ``gen_*`` — 1- and 4-step LCM-consistency generation over the teacher UNet and the
  50-step DDIM teacher (CFG 7.5), batch 8 at 512 px, through ``diffdistill.sampling.generate``
  including prompt encoding and VAE decoding (images/s).

Output: ``$OUT/results.json`` and ``$OUT/results.md`` (``$OUT`` defaults to ./gpu_check_out).

    python benchmarks/gpu_check.py [--tiny] [--out DIR] [--only train_lcd_lora gen_lcm_1step]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]

# --- Stable Diffusion 1.5 architecture (runwayml/stable-diffusion-v1-5 configs) -------------
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# --- SDXL architecture (stabilityai/stable-diffusion-xl-base-1.0 configs) --------------------
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
# --- SD3-medium architecture (stabilityai/stable-diffusion-3-medium-diffusers configs; no T5:
# the pipeline runs with text_encoder_3=None, its 256 rows of prompt embedding zeros) --------
SD3_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
SD3_VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
OPENCLIP_BIGG_TEXT = {  # laion CLIP-ViT-bigG-14 text tower (SDXL text_encoder_2)
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, matched on torch.cuda.get_device_name().
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}

UNITS = {
    "it_per_s": "training steps per second (train_step calls / wall s)",
    "s_per_step": "seconds per training step",
    "peak_mem_gib": "GiB, torch.cuda.max_memory_allocated after reset_peak_memory_stats",
    "peak_rss_delta_gib": "GiB, CPU only: peak process RSS (VmHWM) minus RSS before setup()",
    "flops_per_step": "FLOP of one train_step (FlopCounterMode; forward + backward)",
    "achieved_tflops": "1e12 FLOP/s = flops_per_step * it_per_s",
    "mfu": "fraction of the GPU's dense bf16 peak (null on CPU or unknown GPU)",
    "images_per_s": "images per second, batch generation incl. prompt encoding + VAE decode",
    "s_per_batch": "seconds per generate() call",
    "resolution": "pixels (square)",
    "batch_size": "samples per step / per generate() call",
    "wall_s": "seconds of the whole stage",
}


# --- helpers --------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Ctx:
    def __init__(self, args):
        import torch

        self.args = args
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = "cuda" if self.cuda else "cpu"
        self.bf16 = self.cuda
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.sd_dir: Path | None = None
        self.sdxl_dir: Path | None = None
        self.sd3_dir: Path | None = None
        self.res_sd = 32 if self.tiny else 512
        self.res_sdxl = 32 if self.tiny else 1024
        name = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"
        self.device_name = name
        self.peak_flops = None
        if self.cuda:
            for key, val in PEAK_BF16.items():
                if key in name:
                    self.peak_flops = val
                    break

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


_WRITE: Callable[[dict], None] | None = None  # set by main(): rewrite the reports


def run_stage(results: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one stage; its result or its traceback tail goes to ``results["stages"][name]``
    and the reports are rewritten, so a run killed by a timeout keeps the finished stages."""
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn() or {}
        status = out.pop("status", "ok")
        entry = {"status": status, **out}
    except Exception:  # noqa: BLE001 - any stage failure is recorded and the run goes on
        entry = {"status": "error", "error": _tail(traceback.format_exc())}
    entry["wall_s"] = round(time.perf_counter() - t0, 3)
    results["stages"][name] = entry
    brief = {k: v for k, v in entry.items() if k not in ("error", "stderr_tail")}
    print(f"[gpu_check] {name}: {json.dumps(brief, default=str)}", flush=True)
    if entry["status"] == "error":
        print(entry["error"], file=sys.stderr, flush=True)
    if _WRITE is not None:
        _WRITE(results)


# --- models ---------------------------------------------------------------------------------
def build_models(ctx: Ctx) -> dict:
    import torch

    ctx.sd_dir, ctx.sdxl_dir, ctx.sd3_dir = ctx.tmp / "sd15", ctx.tmp / "sdxl", ctx.tmp / "sd3"
    folders = {"sd15": str(ctx.sd_dir), "sdxl": str(ctx.sdxl_dir), "sd3": str(ctx.sd3_dir)}
    if ctx.tiny:
        from diffdistill.tiny import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

        tiny_sd_pipeline().save_pretrained(str(ctx.sd_dir), safe_serialization=True)
        tiny_sdxl_pipeline().save_pretrained(str(ctx.sdxl_dir), safe_serialization=True)
        tiny_sd3_pipeline().save_pretrained(str(ctx.sd3_dir), safe_serialization=True)
        return {**folders, "models": "tiny"}

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffdistill.tiny import SD3_SCHEDULER, SD_SCHEDULER, clip_tokenizer_dir
    from diffdistill.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer(clip_tokenizer_dir())
    # Random init on the GPU (much faster than CPU init of ~4.5 B parameters); saved in bf16
    # (the trainers load it back in their own dtypes).
    dev = torch.device(ctx.device)
    save_dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    counts = {}

    def make(cls, *a, **kw):
        with dev:
            torch.manual_seed(0)
            m = cls(*a, **kw)
        return m.to(save_dtype).eval()

    unet = make(UNet2DConditionModel, **SD15_UNET)
    vae = make(AutoencoderKL, **SD15_VAE)
    te = make(CLIPTextModel, CLIPTextConfig(**CLIP_L_TEXT))
    counts["sd15_unet_params"] = sum(p.numel() for p in unet.parameters())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(ctx.sd_dir), safe_serialization=True)
    del pipe, unet, vae
    torch.cuda.empty_cache() if ctx.cuda else None

    unet = make(UNet2DConditionModel, **SDXL_UNET)
    counts["sdxl_unet_params"] = sum(p.numel() for p in unet.parameters())
    sched = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                      if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = StableDiffusionXLPipeline(
        vae=make(AutoencoderKL, **SDXL_VAE), text_encoder=te,
        text_encoder_2=make(CLIPTextModelWithProjection, CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(ctx.sdxl_dir), safe_serialization=True)
    del pipe, unet, te
    if ctx.cuda:
        torch.cuda.empty_cache()

    mmdit = make(SD3Transformer2DModel, **SD3_TRANSFORMER)
    counts["sd3_transformer_params"] = sum(p.numel() for p in mmdit.parameters())
    pipe = StableDiffusion3Pipeline(
        transformer=mmdit, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=make(AutoencoderKL, **SD3_VAE),
        text_encoder=make(CLIPTextModelWithProjection, CLIPTextConfig(**CLIP_L_TEXT)),
        text_encoder_2=make(CLIPTextModelWithProjection, CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
        tokenizer=tok, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(ctx.sd3_dir), safe_serialization=True)
    del pipe, mmdit
    if ctx.cuda:
        torch.cuda.empty_cache()
    return {**folders, "models": "real-size random",
            "saved_dtype": str(save_dtype).replace("torch.", ""), **counts}


# --- training -------------------------------------------------------------------------------
def _train_cases(ctx: Ctx) -> dict[str, dict]:
    """Stage name -> (trainer module, class, config overrides, model: sd15 / sdxl / sd3)."""
    lora = {"type": "lora", "rank": 64}
    dmd_common = {"fake_updates_per_generator_update": 2}  # measured steps alternate G / D
    sd_bs = ctx.args.train_batch
    return {
        "train_lcd_lora": {"mod": "lcd", "cls": "LCDTrainer", "model": "sd15", "bs": sd_bs,
                               "over": {"adapter": lora}},
        "train_dmd2_lora": {"mod": "dmd2", "cls": "DMD2Trainer", "model": "sd15", "bs": sd_bs,
                                "over": {"adapter": lora, "dmd2": dmd_common}},
        "train_dmd2_full": {"mod": "dmd2", "cls": "DMD2Trainer", "model": "sd15", "bs": sd_bs,
                                "over": {"adapter": {"type": "full"}, "dmd2": dmd_common}},
        "train_fdistill_lora": {"mod": "fdistill", "cls": "FDistillTrainer", "model": "sd15", "bs": sd_bs,
                                    "over": {"adapter": lora, "dmd2": dmd_common}},
        "train_sdxl_lcd_lora": {"mod": "lcd", "cls": "LCDTrainer", "model": "sdxl", "bs": 1 if not ctx.tiny
                                    else 2,
                                    "over": {"adapter": lora,
                                          "model": {"gradient_checkpointing": True}}},
        # the MMDiT's LoRA covers both attention streams; the GAN head reads its middle block
        "train_sd3_dmd2_lora": {"mod": "dmd2", "cls": "DMD2Trainer", "model": "sd3",
                                "bs": 1 if not ctx.tiny else 2,
                                "over": {"adapter": lora, "dmd2": dmd_common,
                                         "model": {"gradient_checkpointing": True}}},
    }


def _trainer_config(ctx: Ctx, case: dict, out_dir: Path) -> dict:
    from diffdistill.config import deep_merge

    res = ctx.res_sd if case["model"] == "sd15" else ctx.res_sdxl  # SDXL, SD3: 1024 px
    folder = {"sd15": ctx.sd_dir, "sdxl": ctx.sdxl_dir, "sd3": ctx.sd3_dir}[case["model"]]
    data = {
        "method": case["mod"], "output_dir": str(out_dir), "seed": 0,
        "model": {"path": str(folder),
                  "frozen_dtype": "bf16" if ctx.bf16 else "fp32"},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 16},
        "train": {"max_steps": 1000, "batch_size": case["bs"], "checkpoint_every": 0,
                  "mixed_precision": "bf16" if ctx.bf16 else "no", "cpu": not ctx.cuda,
                  "compile": bool(ctx.args.compile)},
        "log": {"progress": False, "tensorboard": False},
    }
    return deep_merge(data, case["over"])


def train_stage(ctx: Ctx, name: str, case: dict) -> dict:
    import importlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffdistill.config import build_config

    if ctx.sd_dir is None:
        return {"status": "skipped", "reason": "build_models failed"}
    cls = getattr(importlib.import_module(f"diffdistill.trainers.{case['mod']}"), case["cls"])
    data = _trainer_config(ctx, case, ctx.tmp / "runs" / name)
    tr = cls(build_config(cls.config_class, data))
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss0 = (_status_kb("VmRSS") or 0) * 1024
        peak_ok = _reset_rss_peak()
    tr.setup()
    batch = next(tr._batches())
    warm, meas = ctx.args.warmup, ctx.args.steps
    step = 0
    for _ in range(warm):
        tr.global_step = step
        tr.train_step(batch)
        step += 1
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(meas):
        tr.global_step = step
        logs = tr.train_step(batch)
        step += 1
    ctx.sync()
    dt = (time.perf_counter() - t0) / meas
    out: dict[str, Any] = {
        "method": case["mod"], "adapter": data["adapter"]["type"],
        "model": case["model"], "resolution": data["data"]["resolution"],
        "batch_size": case["bs"], "precision": "bf16" if ctx.bf16 else "fp32",
        "gradient_checkpointing": bool(data["model"].get("gradient_checkpointing", False)),
        "compiled": data["train"]["compile"],
        "warmup_steps": warm, "measured_steps": meas,
        "s_per_step": dt, "it_per_s": 1.0 / dt,
        "last_logs": {k: float(v) for k, v in (logs or {}).items()
                      if isinstance(v, (int, float)) or torch.is_tensor(v)},
    }
    if ctx.cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        hwm = _status_kb("VmHWM")
        out["peak_rss_delta_gib"] = ((hwm * 1024 - rss0) / 2**30
                                     if (hwm is not None and peak_ok) else None)
    # FLOPs: one extra (untimed) step under the counter, same step parity as the first
    # measured one, so the count matches what was timed on average for the G/D alternation.
    flops = []
    # Compiled kernels do not pass the dispatcher the counter hooks: count in eager mode.
    for _ in range(2 if "dmd2" in data else 1):
        counter = FlopCounterMode(display=False)
        stance = (torch.compiler.set_stance("force_eager") if data["train"]["compile"]
                  else contextlib.nullcontext())
        with counter, stance:
            tr.global_step = step
            tr.train_step(batch)
            step += 1
        flops.append(counter.get_total_flops())
    f = sum(flops) / len(flops)
    out["flops_per_step"] = f
    out["achieved_tflops"] = f / dt / 1e12
    out["mfu"] = (f / dt / ctx.peak_flops) if ctx.peak_flops else None
    if "dmd2" in data:
        out["notes"] = ("fake_updates_per_generator_update=2: the measured steps alternate "
                        "generator+fake and fake-only updates; it/s and FLOPs are their mean")
    del tr, batch
    if ctx.cuda:
        torch.cuda.empty_cache()
    return out


# --- generation -----------------------------------------------------------------------------
def gen_stages(ctx: Ctx, results: dict) -> None:
    import torch

    from diffdistill.backbone import load_backbone
    from diffdistill.denoiser import LCMConsistency
    from diffdistill.sampling import generate, lcm_timesteps

    state: dict[str, Any] = {}

    def load():
        if ctx.sd_dir is None:
            raise RuntimeError("build_models failed")
        dtype = torch.bfloat16 if ctx.bf16 else torch.float32
        state["bb"] = bb = load_backbone(ctx.sd_dir, dtype=dtype, device=ctx.device)
        state["shape"] = (bb.latent_channels, ctx.res_sd // bb.vae_scale_factor,
                          ctx.res_sd // bb.vae_scale_factor)
        return {"teacher": "sd15", "dtype": str(dtype).replace("torch.", "")}

    run_stage(results, "gen_load_teacher", load)
    batch = ctx.args.gen_batch
    prompts = [f"a photo of a {w}" for w in ("bag", "coat", "sneaker", "dress")]
    ddim_steps = 4 if ctx.tiny else 50
    cases = {
        "gen_lcm_1step": {"consistency": True, "sampler": "lcm", "steps": 1, "gs": 1.0},
        "gen_lcm_4step": {"consistency": True, "sampler": "lcm", "steps": 4, "gs": 1.0},
        f"gen_ddim_{ddim_steps}step_teacher": {"consistency": False, "sampler": "ddim",
                                                   "steps": ddim_steps, "gs": 7.5},
    }

    def one(case):
        if "bb" not in state:
            return {"status": "skipped", "reason": "teacher did not load"}
        bb = state["bb"]
        model = bb.denoiser()
        if case["consistency"]:
            model = LCMConsistency(model)
        cfg = case["gs"] != 1.0

        def call(n_steps):
            ts = lcm_timesteps(n_steps) if case["sampler"] == "lcm" else None
            return generate(
                model, seeds=list(range(batch)), shape=state["shape"],
                cond_fn=lambda idx: bb.encode_prompts(
                    (prompts * batch)[:batch][idx], with_uncond=cfg),
                sampler=case["sampler"], num_steps=n_steps, timesteps=ts,
                guidance_scale=case["gs"], batch_size=batch, decode=bb.decode_latents,
                output="uint8", progress=False,
                autocast_dtype=torch.bfloat16 if ctx.bf16 else None)

        call(min(case["steps"], 2))  # warm-up (kernels, allocator)
        ctx.sync()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        imgs = call(case["steps"])
        ctx.sync()
        dt = time.perf_counter() - t0
        out = {"sampler": case["sampler"] + ("+LCMConsistency" if case["consistency"] else ""),
               "num_steps": case["steps"], "guidance_scale": case["gs"], "batch_size": batch,
               "resolution": ctx.res_sd, "s_per_batch": dt, "images_per_s": batch / dt,
               "images_shape": list(imgs.shape)}
        if ctx.cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    for name, case in cases.items():
        run_stage(results, name, lambda c=case: one(c))
    state.clear()
    if ctx.cuda:
        torch.cuda.empty_cache()


# --- accelerate launch of the sharded configs -----------------------------------------------
DEEPSPEED_HINT = "add it to ./wheels with benchmarks/gpu_prepare.sh; see benchmarks/gpu_check.sh"
#: stage -> (config in configs/accelerate, what it is, a module it needs besides accelerate,
#: the method trained with full weights, its config overrides). FSDP runs DMD2, the README's
#: FSDP example (two trained networks, which DeepSpeed cannot drive), then two bisection
#: launches: DMD2 without its GAN term, and plain pretraining (one network, no frozen pass
#: through a trained one). ZeRO-2 runs LCD (one trained network).
NO_GAN = {"dmd2": {"gan_generator_weight": 0.0, "gan_discriminator_weight": 0.0}}
LAUNCHES = {
    "fsdp_launch": ("fsdp.yaml", "FSDP", None, "dmd2", {}),
    "fsdp_launch_dmd2_nogan": ("fsdp.yaml", "FSDP", None, "dmd2", NO_GAN),
    "fsdp_launch_pretrain": ("fsdp.yaml", "FSDP", None, "pretrain", {}),
    "zero2_launch": ("deepspeed_zero2.yaml", "DeepSpeed ZeRO-2", "deepspeed", "lcd", {}),
}


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def launch_stage(ctx: Ctx, name: str) -> dict:
    """``accelerate launch --config_file configs/accelerate/<config> --num_processes 1 -m
    diffdistill.train CFG``: one step of the stage's method with full weights, then its
    export (see :data:`LAUNCHES`; DeepSpeed: one trained network, see the comment in
    deepspeed_zero2.yaml)."""
    config, what, needs, method, over = LAUNCHES[name]
    if needs is not None and not _module_available(needs):
        return {"status": "skipped", "reason": f"{needs} not installed ({DEEPSPEED_HINT})"}
    if not ctx.cuda or ctx.tiny:
        return {"status": "skipped",
                "reason": f"{what} needs CUDA + NCCL" if not ctx.cuda else "--tiny run"}
    if ctx.sd_dir is None:
        return {"status": "skipped", "reason": "build_models failed"}
    import yaml

    case = {"mod": method, "model": "sd15", "bs": 2, "over": {"adapter": {"type": "full"}, **over}}
    data = _trainer_config(ctx, case, ctx.tmp / "runs" / name)
    data["train"].update(max_steps=1)
    data["train"].pop("cpu")
    cfg_path = ctx.tmp / f"{name}_{method}_full.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / config), "--num_processes", "1",
           "-m", "diffdistill.train", str(cfg_path)]
    # FSDP: synchronous kernels, so a CUDA fault names the operation that caused it (the
    # 2026-11-28 run's illegal memory access surfaced only at the backward call)
    env = {**os.environ, **({"CUDA_LAUNCH_BLOCKING": "1"} if what == "FSDP" else {})}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.args.launch_timeout,
                           cwd=str(REPO), env=env, check=False)
        rc, err, out = p.returncode, p.stderr, p.stdout
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    # the whole stderr beside the results: a traceback's first frames are the useful ones
    (Path(ctx.out_dir) / f"{name}.stderr.txt").write_text(err)
    export = Path(data["output_dir"]) / "export"
    res = {"command": " ".join(cmd), "config": config, "method": method, "adapter": "full",
           "steps": 1, "returncode": rc, "launch_s": time.perf_counter() - t0,
           "exported": sorted(p.name for p in export.iterdir()) if export.is_dir() else None,
           "stderr_tail": _tail(err, 2500), "stdout_tail": _tail(out, 800)}
    metrics = Path(data["output_dir"]) / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        res["last_metrics"] = json.loads(metrics.read_text().strip().splitlines()[-1])
    if rc != 0:
        res["status"] = "error"
        res["error"] = f"accelerate launch returned {rc}; see stderr_tail"
    return res


# --- report ---------------------------------------------------------------------------------
def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e4 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3g}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        f"# gpu_check — {env['device_name']} ({env['device']})",
        "",
        (f"{env['date']} · torch {env['torch']} · diffusers {env['diffusers']} · "
        f"{'tiny models' if results['tiny'] else 'real-size SD1.5 / SDXL, random weights'} · "
        f"peak bf16 {_fmt(env['peak_bf16_flops'])} FLOP/s"),
        "",
        ("| stage | status | res (px) | batch | it/s | images/s | peak mem (GiB) | "
        "TFLOP/step | MFU | wall (s) | note |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["stages"].items():
        mem = s.get("peak_mem_gib")
        if mem is None and s.get("peak_rss_delta_gib") is not None:
            mem = f"{_fmt(s['peak_rss_delta_gib'])} (CPU RSS Δ)"
        flops = s.get("flops_per_step")
        note = s.get("reason") or ""
        if s["status"] == "error":
            note = (s.get("error") or "").strip().splitlines()[-1][:120] if s.get("error") else ""
        if "returncode" in s:
            note = f"returncode {s['returncode']}" + (f"; {note}" if note else "")
        note = note.replace("|", "/")
        lines.append(
            f"| {name} | {s['status']} | {_fmt(s.get('resolution'))} | "
            f"{_fmt(s.get('batch_size'))} | {_fmt(s.get('it_per_s'))} | "
            f"{_fmt(s.get('images_per_s'))} | {_fmt(mem)} | "
            f"{_fmt(flops / 1e12 if flops else None)} | {_fmt(s.get('mfu'))} | "
            f"{_fmt(s.get('wall_s'))} | {note} |")
    lines += ["", "Units: " + "; ".join(f"`{k}`: {v}" for k, v in UNITS.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, 32 px, fp32 (CPU test)")
    p.add_argument("--cpu", action="store_true", help="ignore CUDA")
    p.add_argument("--out", default=None, help="output folder (default $OUT or ./gpu_check_out)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up train steps (2; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="measured train steps (4; tiny 2)")
    p.add_argument("--gen-batch", type=int, default=None, help="generation batch (8; tiny 2)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="SD1.5 training batch (4; tiny 2); SDXL stays at 1")
    p.add_argument("--launch-timeout", "--fsdp-timeout", dest="launch_timeout", type=int,
                   default=240, help="seconds per accelerate-launch stage")
    p.add_argument("--only", nargs="*", default=None, help="run only these stages")
    p.add_argument("--compile", action="store_true",
                   help="train stages with train.compile=true (the warm-up steps compile)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.steps is None:
        args.steps = 2 if args.tiny else 4
    if args.gen_batch is None:
        args.gen_batch = 2 if args.tiny else 8
    if args.train_batch is None:
        args.train_batch = 2 if args.tiny else 4
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    try:
        import diffusers
        dver = diffusers.__version__
    except ImportError:  # recorded as null; the stages then fail with the reason
        dver = None
    ctx = Ctx(args)
    ctx.out_dir = out_dir
    results: dict[str, Any] = {
        "tiny": args.tiny,
        "env": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": ctx.device, "device_name": ctx.device_name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": dver,
            "python": platform.python_version(), "peak_bf16_flops": ctx.peak_flops,
            "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                               if ctx.cuda else None),
        },
        "units": UNITS,
        "stages": {},
    }
    want = (lambda n: True) if not args.only else (lambda n: n in args.only
                                                   or n == "build_models")
    global _WRITE

    def write(res: dict) -> None:
        (out_dir / "results.json").write_text(json.dumps(res, indent=2, default=str))
        (out_dir / "results.md").write_text(markdown(res))

    _WRITE = write
    t_all = time.perf_counter()
    run_stage(results, "build_models", lambda: build_models(ctx))
    if results["stages"]["build_models"]["status"] != "ok":
        ctx.sd_dir = ctx.sdxl_dir = None
    # The launches first: they are pass/fail checks in fresh processes, which then find the
    # GPU empty, and a run cut short by its timeout still has them.
    for name in LAUNCHES:
        if want(name):
            run_stage(results, name, lambda n=name: launch_stage(ctx, n))
    for name, case in _train_cases(ctx).items():
        if want(name):
            run_stage(results, name, lambda n=name, c=case: train_stage(ctx, n, c))
    if not args.only or any(n.startswith("gen_") for n in args.only):
        gen_stages(ctx, results)
    results["total_wall_s"] = time.perf_counter() - t_all
    write(results)
    _WRITE = None
    print(markdown(results))
    import shutil

    shutil.rmtree(ctx.tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
