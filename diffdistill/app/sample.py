"""``diffdistill sample``: images from a full export, or from a base folder plus a LoRA."""

from __future__ import annotations


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
    from diffdistill.backbone import grid_shape
    from diffdistill.config import ConfigError
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.eval_model import load_eval_model
    from diffdistill.images import save_grid
    from diffdistill.sampling import generate

    spec = BenchModel(name="sample", path=args.model, lora=args.lora, sampler=args.sampler,
                      guidance_scale=args.guidance_scale)
    model = load_eval_model(spec)
    bb = model.backbone
    steps = args.steps or int(model.info.get("steps", 4))
    if getattr(args, "resolution", None):
        from diffdistill.data import check_resolution

        try:  # Flux packs 2x2 latent patches
            check_resolution(args.resolution,
                             bb.vae_scale_factor * (2 if bb.kind == "flux" else 1))
        except ValueError as e:
            raise ConfigError(f"--resolution: {e}") from None
        bb.set_resolution(args.resolution)  # a resolution-shifted flow also takes its μ
    if bb.kind == "pixel":
        items = [lab for lab in (args.class_label or [0]) for _ in range(args.num)]
    else:
        items = [p for p in (args.prompt or ["a photo of a sneaker"]) for _ in range(args.num)]
    shape = grid_shape(bb, bb.resolution)
    prompts = _Items(items)
    seeds = [args.seed + i for i in range(len(items))]
    imgs = generate(model.denoiser, seeds=seeds, shape=shape,
                    cond_fn=lambda idx: model.cond(prompts, range(len(items))[idx]),
                    sampler=model.sampler, num_steps=steps,
                    timesteps=model.grid_for(steps) if model.sampler != "onestep" else None,
                    guidance_scale=model.guidance_scale if model.cfg_active else 1.0,
                    decode=None if bb.kind == "pixel" else bb.decode_latents, output="uint8",
                    compile=getattr(args, "compile", False),
                    sampler_opts=model.sampler_opts or None)
    path = save_grid(imgs, args.out, nrow=args.num)
    print(f"wrote {len(items)} images ({model.sampler}, {steps} steps, guidance "
          f"{model.guidance_scale}) to {path}")
    return 0
