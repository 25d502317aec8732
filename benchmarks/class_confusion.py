"""Which class the world's Fashion-MNIST classifier sees in a class-conditional model's samples.

    python benchmarks/class_confusion.py world:teacher_pixel --steps 10 --guidance-scale 3 \
        --num 100 --grid runs/pixel_classes.png

Sample i asks for class i % 10 with seed i (the bench's own sample i, through
``EvalModel.sample``); the script prints the classifier's agreement and the 10 × 10 confusion
matrix (rows: the class asked for, columns: the class predicted) and writes the first 40
samples as a grid (one column per class). A model whose samples look right in the grid but
land in one or two columns of the matrix is off the data distribution in a way the eye
forgives (colour casts, background noise): what FID-FMNIST punishes.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a class-conditional pixel model folder or world:NAME")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--grid", default=None, help="PNG of the first 40 samples")
    args = ap.parse_args(argv)

    from diffdistill.eval.eval_model import EvalModel
    from diffdistill.eval.features import get_detector

    import diffdistill.world  # noqa: F401  (registers the fmnist-net detector)
    from diffdistill.backbone import load_backbone
    from diffdistill.world import resolve_model_path

    bb = load_backbone(resolve_model_path(args.model))
    model = EvalModel("probe", bb, bb.denoiser(), args.sampler,
                      guidance_scale=args.guidance_scale)
    imgs = model.sample(list(range(args.num)), args.steps, resolution=32,
                        batch_size=min(args.num, 250))
    pred = get_detector("fmnist-net").predict(imgs)
    asked = torch.arange(args.num) % 10
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for a, p in zip(asked.tolist(), pred.tolist()):
        confusion[a, p] += 1
    print(json.dumps({"model": args.model, "steps": args.steps,
                      "guidance_scale": args.guidance_scale, "num": args.num,
                      "agreement": float((pred == asked).float().mean()),
                      "confusion": confusion.tolist()}))
    if args.grid:
        from diffdistill.images import save_grid

        save_grid(imgs[:40], args.grid, nrow=10, scale=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
