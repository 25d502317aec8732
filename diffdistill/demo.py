"""``diffdistill demo``: the end-to-end path on data that ships with the machine.

Current scope (until the embedded world's shipped teachers land): build a small pixel
class-conditional UNet, pretrain it on Fashion-MNIST (16×16) with the project's own
pretraining trainer, export it as a stock diffusers pipeline, and write a sample grid made
through the shared sampler. Every step is the same code a real run uses.
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: str = "runs/demo", steps: int = 300, batch_size: int = 32,
             resolution: int = 16) -> int:
    from diffdistill.config import build_config
    from diffdistill.images import save_grid
    from diffdistill.tiny import tiny_pixel_pipeline
    from diffdistill.trainers.pretrain import PretrainConfig, PretrainTrainer

    root = Path(out)
    t0 = time.perf_counter()
    init = root / "teacher_init"
    if not (init / "model_index.json").exists():
        print(f"[1/3] building a class-conditional pixel UNet in {init}")
        tiny_pixel_pipeline(sample_size=resolution, seed=0).save_pretrained(str(init))
    cfg = build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(root / "pretrain"), "seed": 0,
        "model": {"path": str(init)},
        "data": {"kind": "fashion_mnist", "resolution": resolution},
        "train": {"max_steps": steps, "batch_size": batch_size, "lr": 2e-3,
                  "checkpoint_every": 0, "ema_decay": 0.99, "lr_warmup_steps": 20},
        "log": {"every": 25, "tensorboard": False},
        "pretrain": {"cond_dropout": 0.1, "guidance_scale": 2.0},
    })
    print(f"[2/3] pretraining for {steps} steps on Fashion-MNIST ({resolution}x{resolution})")
    trainer = PretrainTrainer(cfg)
    last = trainer.fit()
    print(f"      final loss {last.get('loss', float('nan')):.4f}")
    print("[3/3] sampling a grid (DDIM, 25 steps, CFG 2) through the shared sampler")
    imgs = trainer.sample_images(list(range(40)))
    grid = save_grid(imgs, root / "teacher_grid.png", nrow=10, scale=4)
    export = root / "pretrain" / "export"
    print(f"\nDone in {time.perf_counter() - t0:.0f} s.")
    print(f"  sample grid : {grid}")
    print(f"  export      : {export}")
    print("  load it in stock diffusers:")
    print("    from diffusers import DiffusionPipeline")
    print(f"    pipe = DiffusionPipeline.from_pretrained('{export}')")
    return 0
