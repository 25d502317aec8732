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
from diffdistill.export import EXPORT_INFO  # noqa: E402,F401  (written beside every export)


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
    """Load a diffusers-format LoRA (``unet.`` keys) into ``unet``; fail clearly on mismatch
    (a :class:`~diffdistill.config.ConfigError`: the command prints it and exits 2)."""
    from diffdistill.config import ConfigError

    if not (lora_dir / LORA_FILE).exists():
        raise FileNotFoundError(f"--lora {lora_dir}: no {LORA_FILE} in that folder")
    try:
        unet.load_lora_adapter(str(lora_dir), weight_name=LORA_FILE, prefix="unet",
                               adapter_name="default")
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"--lora {lora_dir} does not fit this base model (shape or key "
                          f"mismatch: {str(e).splitlines()[0][:300]}); was it trained on a "
                          "different base?") from None


class _Items:
    """Per-sample prompts or class labels in the shape ``EvalModel.cond`` reads."""

    def __init__(self, items: list):
        self.items = items

    def caption(self, i: int) -> str:
        return self.items[i]

    def label(self, i: int, num_classes: int) -> int:
        return int(self.items[i])


def sample_command(args) -> int:
    """Load the model exactly as ``diffdistill bench`` does, then write a grid."""
    from diffdistill.eval.harness import BenchModel, load_eval_model
    from diffdistill.images import save_grid
    from diffdistill.sampling import generate

    spec = BenchModel(name="sample", path=args.model, lora=args.lora, sampler=args.sampler,
                      guidance_scale=args.guidance_scale)
    model = load_eval_model(spec)
    bb = model.backbone
    steps = args.steps or int(model.info.get("steps", 4))
    if bb.kind == "pixel":
        items = [lab for lab in (args.class_label or [0]) for _ in range(args.num)]
        shape = (bb.unet.config.in_channels, bb.resolution, bb.resolution)
    else:
        items = [p for p in (args.prompt or ["a photo of a sneaker"]) for _ in range(args.num)]
        f = bb.vae_scale_factor
        shape = (bb.latent_channels, bb.resolution // f, bb.resolution // f)
    prompts = _Items(items)
    seeds = [args.seed + i for i in range(len(items))]
    imgs = generate(model.denoiser, seeds=seeds, shape=shape,
                    cond_fn=lambda idx: model.cond(prompts, range(len(items))[idx]),
                    sampler=model.sampler, num_steps=steps,
                    timesteps=model.grid_for(steps) if model.sampler != "onestep" else None,
                    guidance_scale=model.guidance_scale if model.cfg_active else 1.0,
                    decode=None if bb.kind == "pixel" else bb.decode_latents, output="uint8",
                    sampler_opts=model.sampler_opts or None)
    path = save_grid(imgs, args.out, nrow=args.num)
    print(f"wrote {len(items)} images ({model.sampler}, {steps} steps, guidance "
          f"{model.guidance_scale}) to {path}")
    return 0
