"""How well conditioned is a one-step ε-generator at its conditioning timestep? (docs/one_step.md)

A one-step DMD2 generator initialised from an ε-prediction teacher maps pure noise z to
x0̂ = (z − σ_c ε̂(z, t_c)) / α_c. For each conditioning timestep t_c this script measures, on
the world's latent teacher (the generator's initialisation, no training):

* ``sigma/alpha`` — the factor by which an error of the network output ε̂ reaches x0̂;
* ``dx0/deps`` — the same factor measured: a small random perturbation of the UNet's weights
  (relative size ``--perturb``), ‖Δx0̂‖ / ‖Δε̂‖ over the batch (equals σ/α: a check);
* ``x0 std`` — the spread of the initial one-step samples (data latents: 1.0);
* ``FID@init`` — FID-FMNIST of 1000 initial one-step samples (seeds 0..999, the world's class
  prompts), i.e. where training starts.

    python benchmarks/one_step_conditioning.py [--timesteps 999 799 599 399] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 899, 799, 699, 599, 499,
                                                                  399])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--perturb", type=float, default=1e-3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    from diffdistill.eval.bench_config import BenchReference
    from diffdistill.eval.eval_model import EvalModel
    from diffdistill.eval.features import get_detector
    from diffdistill.eval.fid import fid_from_stats
    from diffdistill.eval.generation import generate_for_eval
    from diffdistill.eval.prompts import EvalPrompts
    from diffdistill.eval.reference import reference_statistics

    from diffdistill.backbone import load_backbone
    from diffdistill.world import asset_path

    torch.manual_seed(0)
    bb = load_backbone(str(asset_path("teacher_latent")))
    unet = bb.unet.eval()
    noisy = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(args.perturb * p.abs().mean() * torch.randn(p.shape, generator=g))
    det = get_detector("fmnist-net")
    ref = reference_statistics(det, BenchReference(resolution=32))
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = bb.encode_prompts([EvalPrompts().caption(i) for i in range(64)], with_uncond=False)
    rows = []
    for tc in args.timesteps:
        t0 = time.perf_counter()
        alpha, sigma = (float(v) for v in bb.schedule.alpha_sigma(torch.tensor([float(tc)])))
        with torch.no_grad():
            a, b = bb.denoiser(unet)(z, float(tc), cond), bb.denoiser(noisy)(z, float(tc), cond)
        gain = float((a.x0 - b.x0).norm() / (a.eps - b.eps).norm())
        spec = EvalModel(f"t{tc}", bb, bb.denoiser(unet), "lcm", timesteps=lambda n, tc=tc: [tc])
        gen = generate_for_eval(spec, list(range(args.num_samples)), num_steps=1,
                                detectors=[det], resolution=32, batch_size=250)
        rows.append({"t_c": tc, "alpha": alpha, "sigma": sigma, "sigma_over_alpha": sigma / alpha,
                     "dx0_over_deps": gain, "x0_std": float(a.x0.std()),
                     "fid_fmnist_init": fid_from_stats(gen.stats[det.name], ref),
                     "seconds": round(time.perf_counter() - t0, 1)})
        r = rows[-1]
        print(f"t_c={tc:4d}  sigma/alpha={r['sigma_over_alpha']:6.2f}  dx0/deps={gain:6.2f}  "
              f"x0 std={r['x0_std']:.2f}  FID@init={r['fid_fmnist_init']:.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/one_step_conditioning.py",
                       "num_samples": args.num_samples, "perturb": args.perturb, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
