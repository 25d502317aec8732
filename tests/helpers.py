"""Helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations


def tiny_run_data(method: str, model_dir, out, res: int, **sections) -> dict:
    """A short CPU run on a tiny fixture model: the config dict every trainer test starts from."""
    from diffdistill.config import deep_merge

    data = {
        "method": method, "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True},
        "adapter": {"type": "full", "rank": 4},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    return deep_merge(data, sections)


def stock_sd_pipeline(base_dir, scheduler_cls, lora_dir=None, weight_name=None):
    """A fresh stock StableDiffusionPipeline with ``scheduler_cls`` and optionally a LoRA."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if weight_name:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe
