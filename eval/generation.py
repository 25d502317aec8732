"""Generate N evaluation samples across processes and measure them as they come
(:func:`generate_for_eval`): streaming Fréchet statistics, CLIP score, class agreement, the
features precision / recall needs, seconds per image and peak memory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffdistill.eval.eval_model import EvalModel
from diffdistill.eval.memory import PeakMemory, sync_device
from diffdistill.eval.prompts import EvalPrompts


def _rank_world(accelerator=None) -> tuple[int, int]:
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def shard_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """Rank ``rank``'s batches: the N samples cut into batches of ``batch_size``, then each
    rank takes a contiguous block of whole batches (so every image is generated in the same
    batch as with one process). The union over ranks is exactly ``range(n)``."""
    if n < 0 or batch_size < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard request n={n} batch_size={batch_size} rank={rank}/{world}")
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    lo, hi = len(batches) * rank // world, len(batches) * (rank + 1) // world
    return batches[lo:hi]



def resize_for_eval(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """uint8 NCHW → centre crop + LANCZOS to ``resolution`` (the reference images' own
    processing, ``diffdistill.eval.fid``); unchanged when already that size or None."""
    import numpy as np
    from diffdistill.eval.fid import _center_crop_resize
    from PIL import Image

    if resolution is None or (images.shape[-2] == images.shape[-1] == resolution):
        return images
    out = []
    for img in images:
        pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
        arr = np.asarray(_center_crop_resize(pil, int(resolution)))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out)


@dataclass
class EvalGeneration:
    """What :func:`generate_for_eval` measured (identical on every rank)."""

    count: int
    timesteps: list[float]
    stats: dict  # detector name -> all-reduced FeatureStats
    clip_score: float | None
    grid: torch.Tensor | None  # uint8 [grid_samples, 3, H, W], sample order
    seeds_by_rank: list[list[int]]
    gen_seconds: float  # summed over processes
    peak_memory_bytes: int | None  # max over processes; None: not measured on this platform
    peak_memory_kind: str
    features: dict = field(default_factory=dict)  # detector name -> [N, D] fp32, sample order
    class_agreement: float | None = None  # share of samples the classifier puts in their class

    @property
    def sec_per_image(self) -> float:
        return self.gen_seconds / max(self.count, 1)


@torch.no_grad()
def generate_for_eval(model: EvalModel, seeds: Sequence[int], *, num_steps: int,
                      prompts: EvalPrompts | None = None, detectors: Sequence = (),
                      clip=None, clip_prefix: str = "", resolution: int | None = None,
                      batch_size: int = 16, grid_samples: int = 0, accelerator=None,
                      progress: bool = False, warmup: bool = False,
                      autocast_dtype: torch.dtype | None = None,
                      keep_features: Sequence[str] = (), classifier=None) -> EvalGeneration:
    """Generate sample ``i`` with seed ``seeds[i]`` and prompt ``i`` for every i, this rank's
    share only (:func:`shard_batches`), and measure it: features of every detector in
    all-reduced ``FeatureStats``, the CLIP score (mean cosine) when ``clip`` is given, the
    first ``grid_samples`` images gathered, generation seconds and peak memory. The per-sample
    features of the detectors named in ``keep_features`` are gathered in sample order (for
    precision / recall; images are never kept). ``classifier`` (a module with ``predict``
    returning class indices, e.g. the world's Fashion-MNIST net) gives the class agreement:
    the share of samples whose predicted class is the world class their prompt asked for
    (None when the prompts are not world classes). Every rank must call it (collectives)."""
    from diffdistill.eval.clip_score import clip_score
    from diffdistill.eval.fid import FeatureStats
    from tqdm.auto import tqdm

    rank, world = _rank_world(accelerator)
    prompts = prompts or EvalPrompts()
    seeds = [int(s) for s in seeds]
    bb = model.backbone
    device = bb.device
    ts = model.grid_for(num_steps)

    def run(indices: list[int]) -> torch.Tensor:
        return model.sample([seeds[i] for i in indices], num_steps, prompts, indices=indices,
                            autocast_dtype=autocast_dtype)

    batches = shard_batches(len(seeds), batch_size, rank, world)
    meta_res = resolution if resolution is not None else "native"
    stats = {d.name: FeatureStats.for_detector(d, resolution=meta_res,
                                               source=f"generated:{model.name}")
             for d in detectors}
    if warmup and batches:
        run(list(batches[0]))
    memory = PeakMemory(device, exclude=[*detectors, clip])
    gen_seconds, clip_sum, clip_n = 0.0, 0.0, 0
    agree, agree_n = 0, 0
    kept: dict[str, list] = {name: [] for name in keep_features}
    done: list[int] = []
    grid_items: dict[int, torch.Tensor] = {}
    bar = tqdm(total=sum(len(b) for b in batches), unit="img",
               desc=f"{model.name} @ {len(ts)} step{'s' if len(ts) != 1 else ''}",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    try:
        for batch in batches:
            idx = list(batch)
            bar.set_postfix_str("generate")
            with memory:
                t0 = time.perf_counter()
                images = run(idx)
                sync_device(device)
                gen_seconds += time.perf_counter() - t0
            done.extend(seeds[i] for i in idx)
            bar.set_postfix_str("features")
            if clip is not None:
                caps = [prompts.clip_caption(i, bb) for i in idx]
                if all(c is not None for c in caps):
                    per = clip_score(clip, images, caps, prefix=clip_prefix,
                                     batch_size=len(idx)).per_image
                    clip_sum += float(per.double().sum())
                    clip_n += len(idx)
            eval_images = resize_for_eval(images, resolution)
            for d in detectors:
                feats = d(eval_images)
                stats[d.name].update(feats)
                if d.name in kept:
                    kept[d.name].append(feats.float().cpu())
            if classifier is not None:
                asked = [prompts.world_class(i, bb) for i in idx]
                if all(c is not None for c in asked):
                    predicted = classifier.predict(eval_images).cpu()
                    agree += int((predicted == torch.tensor(asked)).sum())
                    agree_n += len(idx)
            for j, i in enumerate(idx):
                if i < grid_samples:
                    grid_items[i] = eval_images[j].clone()
            bar.update(len(idx))
    finally:
        bar.close()
        peak = memory.close()
    for s in stats.values():
        s.all_reduce(accelerator)
    parts = _gather_objects({"seeds": done, "seconds": gen_seconds, "clip": (clip_sum, clip_n),
                             "grid": grid_items, "peak": peak, "agree": (agree, agree_n),
                             "features": {k: torch.cat(v) if v else None
                                          for k, v in kept.items()}}, world)
    agree = sum(p["agree"][0] for p in parts)
    agree_n = sum(p["agree"][1] for p in parts)
    features = {}
    for name in kept:  # ranks hold contiguous blocks in rank order: concatenation = sample order
        chunks = [p["features"][name] for p in parts if p["features"][name] is not None]
        features[name] = torch.cat(chunks) if chunks else None
    clip_sum = sum(p["clip"][0] for p in parts)
    clip_n = sum(p["clip"][1] for p in parts)
    grid = {}
    for p in parts:
        grid.update(p["grid"])
    grid_t = torch.stack([grid[i] for i in sorted(grid)]) if grid else None
    return EvalGeneration(
        count=sum(len(p["seeds"]) for p in parts), timesteps=[float(t) for t in ts],
        stats=stats, clip_score=(clip_sum / clip_n) if clip_n == len(seeds) and clip_n else None,
        grid=grid_t, seeds_by_rank=[p["seeds"] for p in parts],
        gen_seconds=sum(p["seconds"] for p in parts),
        peak_memory_bytes=max(p["peak"] for p in parts) if memory.measured else None,
        peak_memory_kind=memory.kind, features=features,
        class_agreement=agree / agree_n if agree_n == len(seeds) and agree_n else None)

