"""``diffdistill sample``: images from a full export, or from a base folder plus a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

# The sampler each stock scheduler class implies (``--sampler auto``).
SAMPLER_FOR_SCHEDULER = {
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "CMStochasticIterativeScheduler": "lcm",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
}

LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "diffdistill_export.json"  # written by export.py beside every export


def choose_sampler(requested: str, model_dir: Path, lora_dir: Path | None, scheduler_cls: str):
    """``auto``: the export's recorded sampler, else the one its scheduler class implies."""
    if requested != "auto":
        return requested, {}
    for d in (lora_dir, model_dir):
        if d is not None and (d / EXPORT_INFO).exists():
            info = json.loads((d / EXPORT_INFO).read_text())
            return info.get("sampler", "lcm"), info
    return SAMPLER_FOR_SCHEDULER.get(scheduler_cls, "ddim"), {}


def load_lora_into(unet, lora_dir: Path) -> None:
    """Load a diffusers-format LoRA (``unet.`` keys) into ``unet``; fail clearly on mismatch."""
    if not (lora_dir / LORA_FILE).exists():
        raise FileNotFoundError(f"--lora {lora_dir}: no {LORA_FILE} in that folder")
    try:
        unet.load_lora_adapter(str(lora_dir), weight_name=LORA_FILE, prefix="unet",
                               adapter_name="default")
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"--lora {lora_dir} does not fit this base model (shape or key "
                         f"mismatch: {str(e).splitlines()[0][:300]}); was it trained on a "
                         "different base?") from None


def sample_command(args) -> int:
    import torch

    from diffdistill.backbone import load_backbone
    from diffdistill.denoiser import LCMConsistency
    from diffdistill.images import save_grid
    from diffdistill.sampling import default_timesteps, generate

    model_dir = Path(args.model)
    lora_dir = Path(args.lora) if args.lora else None
    bb = load_backbone(str(model_dir))
    if lora_dir is not None:
        load_lora_into(bb.unet, lora_dir)
    sampler, info = choose_sampler(args.sampler, model_dir, lora_dir,
                                   bb.scheduler_config.get("_class_name", ""))
    model = bb.denoiser()
    if sampler in ("lcm", "onestep") and bb.prediction_type != "cm":
        model = LCMConsistency(model)
    # A full LCM student embeds w = guidance_scale - 1 (time_cond_proj_dim) instead of CFG.
    w_dim = getattr(bb.unet.config, "time_cond_proj_dim", None)
    w_embedding = None
    guidance = args.guidance_scale if args.guidance_scale is not None else float(
        info.get("guidance_scale", 1.0))
    cfg_scale = guidance
    if w_dim is not None:
        from diffdistill.denoiser import guidance_scale_embedding

        w_embedding = guidance_scale_embedding(torch.tensor([guidance - 1.0]), w_dim)
        cfg_scale = 1.0
    timesteps = None
    steps = args.steps or int(info.get("steps", 4))
    if info.get("timesteps") and len(info["timesteps"]) == steps:
        timesteps = torch.tensor(info["timesteps"], dtype=torch.float64)
    elif sampler != "onestep":
        timesteps = default_timesteps(sampler, bb.schedule, steps)
    if bb.kind == "pixel":
        labels = args.class_label or [0]
        items = [lab for lab in labels for _ in range(args.num)]
        if bb.num_classes is None:
            def cond_fn(idx):
                return None
        else:
            def cond_fn(idx):
                lab = torch.tensor(items[idx], device=bb.unet.device)
                return bb.class_cond(lab, guidance=cfg_scale != 1.0)
        shape = (bb.unet.config.in_channels, bb.resolution, bb.resolution)
        decode = None
    else:
        prompts = args.prompt or ["a photo of a sneaker"]
        items = [p for p in prompts for _ in range(args.num)]

        def cond_fn(idx):
            cond = bb.encode_prompts(items[idx], with_uncond=cfg_scale != 1.0)
            if w_embedding is not None:
                n = cond.encoder_hidden_states.shape[0]
                cond.timestep_cond = w_embedding.to(cond.encoder_hidden_states).repeat(n, 1)
            return cond

        f = bb.vae_scale_factor
        shape = (bb.latent_channels, bb.resolution // f, bb.resolution // f)
        decode = bb.decode_latents
    seeds = [args.seed + i for i in range(len(items))]
    imgs = generate(model, seeds=seeds, shape=shape, cond_fn=cond_fn, sampler=sampler,
                    num_steps=steps, timesteps=timesteps,
                    guidance_scale=cfg_scale, decode=decode, output="uint8")
    path = save_grid(imgs, args.out, nrow=args.num)
    print(f"wrote {len(items)} images ({sampler}, {steps} steps, guidance {guidance}) to {path}")
    return 0
