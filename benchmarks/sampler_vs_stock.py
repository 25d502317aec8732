"""Shared sampler vs a stock diffusers ``StableDiffusionPipeline`` + ``LCMScheduler``.

Same weights, same batch, same per-sample seeds; the images are asserted identical (to one
uint8 level) before anything is timed. Three contenders run interleaved, several repeats,
medians reported, ratios computed within this one run (the machine is noisy):

* ``stock``   — ``pipe(prompts, num_inference_steps=n, guidance_scale=1, generator=[...])``
* ``ours``    — ``diffdistill.sampling.generate(..., sampler="lcm")`` + VAE decode
* ``floor``   — the bare UNet forward n times + one VAE decode on the same batch (no
  scheduler, no prompt encoding): the cost any sampler must pay.
* ``compiled`` (with ``--compile``) — ``generate(..., compile=True)`` on a second copy of the
  model (torch.compile of its UNet; CPU inductor or CUDA); its first call, which compiles, is
  timed separately and reported as ``compile_s``.

Run:  python benchmarks/sampler_vs_stock.py [--model DIR] [--steps 1 4] [--batch 16] [--compile]
Without --model it uses the embedded world's latent teacher if built, else a tiny
SD-structured pipeline built from configs (stated in the output).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _default_model(tmp: Path) -> tuple[str, str]:
    from diffdistill import world

    shipped = Path(world.__file__).parent / "assets" / "teacher_latent"
    if (shipped / "model_index.json").exists():
        return str(shipped), "embedded world latent teacher"
    from diffdistill.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(str(tmp / "tiny"))
    return str(tmp / "tiny"), "tiny SD-structured pipeline (random weights)"


def run(model_dir: str, steps_list: list[int], batch: int, repeats: int,
        with_compile: bool = False) -> dict:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from diffdistill.backbone import load_backbone
    from diffdistill.denoiser import LCMConsistency
    from diffdistill.sampling import generate, lcm_timesteps

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    bb = load_backbone(model_dir)
    model = LCMConsistency(bb.denoiser())
    res = bb.resolution
    f = bb.vae_scale_factor
    shape = (bb.latent_channels, res // f, res // f)
    prompts = [f"a photo of a {w}" for w in ("bag", "coat", "sneaker", "dress")]
    prompts = (prompts * batch)[:batch]
    seeds = list(range(batch))
    out = {"model": model_dir, "batch": batch, "resolution": res, "results": {}}
    bb_c = load_backbone(model_dir) if with_compile else None  # compiled in place: a copy
    model_c = LCMConsistency(bb_c.denoiser()) if with_compile else None

    def stock(n):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        img = pipe(prompts, num_inference_steps=n, guidance_scale=1.0, generator=gens,
                   height=res, width=res, output_type="pt").images
        return (img * 255).round().clamp(0, 255).to(torch.uint8)

    def ours(n):
        return generate(model, seeds=seeds, shape=shape,
                        cond_fn=lambda idx: bb.encode_prompts(prompts[idx], with_uncond=False),
                        sampler="lcm", num_steps=n, timesteps=lcm_timesteps(n),
                        batch_size=batch, decode=bb.decode_latents, output="uint8",
                        progress=False)

    def compiled(n):
        return generate(model_c, seeds=seeds, shape=shape,
                        cond_fn=lambda idx: bb_c.encode_prompts(prompts[idx], with_uncond=False),
                        sampler="lcm", num_steps=n, timesteps=lcm_timesteps(n),
                        batch_size=batch, decode=bb_c.decode_latents, output="uint8",
                        progress=False, compile=True)

    cond = bb.encode_prompts(prompts, with_uncond=False)
    x = torch.randn(batch, *shape)

    @torch.no_grad()
    def floor(n):
        for t in lcm_timesteps(n):
            bb.unet(x, t.float(), encoder_hidden_states=cond.encoder_hidden_states)
        return bb.vae.decode(x / bb.vae.config.scaling_factor).sample

    for n in steps_list:
        a, b = stock(n), ours(n)  # warm-up and the identity check
        diff = (a.int() - b.int()).abs().max().item()
        assert diff <= 1, f"images differ by {diff} uint8 levels at {n} steps"
        contenders = [("stock", stock), ("ours", ours), ("floor", floor)]
        compile_s = None
        if with_compile:
            t0 = time.perf_counter()
            c = compiled(n)  # compiles (a new step count may recompile)
            compile_s = time.perf_counter() - t0
            cdiff = (a.int() - c.int()).abs().max().item()
            assert cdiff <= 1, f"compiled images differ by {cdiff} uint8 levels at {n} steps"
            contenders.append(("compiled", compiled))
        times = {name: [] for name, _ in contenders}
        for _ in range(repeats):
            for name, fn in contenders:
                t0 = time.perf_counter()
                fn(n)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out["results"][n] = {
            "max_uint8_diff": diff,
            "median_s": med,
            "images_per_s": {k: batch / v for k, v in med.items()},
            "speedup_vs_stock": med["stock"] / med["ours"],
            "ours_over_floor": med["ours"] / med["floor"],
        }
        if with_compile:
            out["results"][n].update(compile_s=compile_s,
                                     compiled_speedup_vs_stock=med["stock"] / med["compiled"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile contender")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, what = (args.model, "user model") if args.model else _default_model(Path(tmp))
        res = run(model, args.steps, args.batch, args.repeats, args.compile)
    res["what"] = what
    res["machine"] = {"cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"model: {what}; batch {args.batch}; {args.repeats} interleaved repeats, medians")
    print("| steps | stock img/s | ours img/s | floor img/s | ours/stock speed-up | "
          "ours time / floor time | max diff |")
    print("|---|---|---|---|---|---|---|")
    for n, r in res["results"].items():
        ips = r["images_per_s"]
        print(f"| {n} | {ips['stock']:.1f} | {ips['ours']:.1f} | {ips['floor']:.1f} | "
              f"{r['speedup_vs_stock']:.2f}x | {r['ours_over_floor']:.2f} | "
              f"{r['max_uint8_diff']} |")
        if args.compile:
            print(f"  compiled, {n} steps: {ips['compiled']:.1f} img/s = "
                  f"{r['compiled_speedup_vs_stock']:.2f}x stock (compile {r['compile_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
