"""Evaluation harness: sample N images per (model, step count) through the shared sampler,
split across processes, and score them — Fréchet distances (FID only on Inception), CLIP
score, seconds per image and peak memory. ``diffdistill bench`` and the Trainer's periodic
quick metric both run through :func:`generate_for_eval`.

Protocol (what the numbers mean; the report states it again)
------------------------------------------------------------
* Sample ``i`` (0 ≤ i < N) uses seed ``seeds_start + i`` (one CPU generator per sample, so
  an image depends only on its seed and prompt — not on batch size or process count) and
  prompt ``i``: the world's class ``i % 10`` with a fixed caption template for text models,
  class label ``i % num_classes`` for class-conditional pixel models, or line ``i`` of a
  captions file (COCO). Every model in a bench sees the same seeds and prompts.
* Processes: the N samples are cut into batches of ``batch_size`` first, and rank r takes a
  contiguous block of whole batches. Every image is therefore generated in exactly the batch
  it would be in with one process, so a multi-process run reproduces the one-process images
  and features, not just their distribution. Features go straight into streaming
  :class:`~diffdistill.eval.fid.FeatureStats` (never stored), which are all-reduced.
* Evaluation resolution: when the reference has one (COCO: 256), reference images are
  centre-cropped and LANCZOS-resized to it (``diffdistill.eval.fid``) and generated images
  go through the very same function before the detectors; the detectors then apply their
  own resizing (e.g. clean-fid bicubic to 299 for Inception).
* Fréchet distance names: "FID" only for the Inception-v3 network of Heusel et al.;
  "FID-FMNIST" for the embedded world's Fashion-MNIST network; "FD-<name>" otherwise (e.g.
  "FD-EffNetLite0"). CLIP score is the mean plain cosine similarity (scale 1, unclamped) of
  the open_clip image and caption embeddings, computed on the generated images as they
  come out of the model.
* Seconds per image: wall time of generation only (sampler + VAE decode, CUDA synchronised),
  after one untimed warm-up batch, summed over processes and divided by N — the cost of one
  image on one device at this batch size. Peak memory, also of generation only:
  ``torch.cuda.max_memory_allocated`` on CUDA (the generator's weights included, the
  resident evaluation networks subtracted); on CPU how far the process's resident set grew
  (sampled from ``/proc/self/statm``, at least the growth of ``getrusage``'s peak), which
  excludes the already loaded weights. The label travels with the number.
* COCO-2014 zero-shot: a captions file (``.txt`` one per line, ``.jsonl``, a JSON list, or
  COCO's ``captions_val2014.json``, of which the first caption of each image is used in
  image-id order) and a folder of reference images; 30k (or 10k) samples, as in the
  distillation papers' tables.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffdistill.config import ConfigError

log = logging.getLogger("diffdistill.eval")

__all__ = [
    "FMNIST_SOURCE",
    "BenchClip",
    "BenchConfig",
    "BenchModel",
    "BenchPrompts",
    "BenchReference",
    "EvalGeneration",
    "EvalModel",
    "EvalPrompts",
    "bench_command",
    "build_eval_prompts",
    "generate_for_eval",
    "load_bench_config",
    "load_eval_model",
    "quick_eval",
    "read_captions",
    "reference_count",
    "reference_statistics",
    "resize_for_eval",
    "run_bench",
    "shard_batches",
]

#: ``source`` metadata of Fashion-MNIST test-split statistics (as the world ships them)
FMNIST_SOURCE = "fashion-mnist/test"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- config


@dataclass
class BenchModel:
    name: str = ""  # row label (table, grid, plot)
    path: str = ""  # full pipeline folder (teacher or export) or world:NAME; the base with lora
    lora: str | None = None  # folder holding pytorch_lora_weights.safetensors
    sampler: str = "auto"  # auto: the export's recorded sampler, else its scheduler's
    steps: list[int] | None = None  # None: the export's served / recorded steps, else [4]
    guidance_scale: float | None = None  # CFG (w+1 for a w-embedding UNet); None: recorded, else 1
    timesteps: list[float] | None = None  # explicit grid for the steps entry of its length
    sampler_opts: dict = field(default_factory=dict)  # e.g. {gamma: 0.3} for tcd


@dataclass
class BenchPrompts:
    kind: Literal["auto", "classes", "captions"] = "auto"  # auto: captions if a file is given
    file: str = ""  # captions file (default: reference.captions)
    template: int = 0  # classes: caption template of diffdistill.data (0: "a photo of a {}")


@dataclass
class BenchReference:
    kind: Literal["fashion_mnist_test", "folder"] = "fashion_mnist_test"
    images: str = ""  # folder: reference images (sorted, recursive)
    captions: str = ""  # folder: the captions the models are prompted with (COCO)
    resolution: int | None = None  # evaluation resolution (fashion_mnist_test: 32)
    max_images: int | None = None  # use only the first N reference images
    fmnist_root: str = ""  # Fashion-MNIST IDX folder (default: $DIFFDISTILL_FMNIST, Debian's)
    stats: dict = field(default_factory=dict)  # detector name -> precomputed FeatureStats .npz
    allow_fewer: bool = False  # evaluate even with fewer reference images than samples


@dataclass
class BenchClip:
    detector: str = ""  # a registered detector, e.g. world-clip
    model: str = ""  # or an open_clip model name, e.g. ViT-g-14 ...
    weights: str = ""  # ... with its local checkpoint (or $DIFFDISTILL_CLIP_WEIGHTS)
    config: str = ""  # open_clip JSON config for architectures open_clip does not know
    prefix: str = ""  # prepended to every caption before the text tower


@dataclass
class BenchConfig:
    models: list[BenchModel] = field(default_factory=list)
    num_samples: int = 10000
    seeds_start: int = 0
    batch_size: int = 64  # generation batch per process (also the feature batch)
    prompts: BenchPrompts = field(default_factory=BenchPrompts)
    reference: BenchReference = field(default_factory=BenchReference)
    detectors: list[str] = field(default_factory=lambda: ["fmnist-net", "effnet-lite0"])
    detector_options: dict = field(default_factory=dict)  # name -> kwargs (weights_path...)
    clip: BenchClip | None = None
    out: str = "runs/bench"
    cache_dir: str | None = None  # reference statistics cache (default OUT/ref_stats)
    grid_samples: int = 8  # grid columns: the first seeds, the same for every row
    warmup: bool = True  # one untimed batch before timing
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # weights of the generators
    imports: list[str] = field(default_factory=list)  # modules that register detectors
    progress: bool = True

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models: list at least one model ({name, path, steps, ...})")
        names = set()
        for i, m in enumerate(self.models):
            key = f"models[{i}]"
            if not m.name:
                raise ConfigError(f"{key}.name is empty")
            if m.name in names:
                raise ConfigError(f"{key}.name {m.name!r} is used twice")
            names.add(m.name)
            if not m.path:
                raise ConfigError(f"{key}.path is empty")
            if m.steps is not None and (not m.steps or any(s < 1 for s in m.steps)):
                raise ConfigError(f"{key}.steps must be a non-empty list of step counts >= 1")
            if m.steps is not None and len(set(m.steps)) != len(m.steps):
                raise ConfigError(f"{key}.steps lists a step count twice: {m.steps}")
            if m.guidance_scale is not None and m.guidance_scale < 0:
                raise ConfigError(f"{key}.guidance_scale must be >= 0")
            if m.timesteps is not None and m.steps is None:
                raise ConfigError(f"{key}.timesteps needs {key}.steps (one entry of its length)")
            if m.timesteps is not None and len(m.timesteps) not in m.steps:
                raise ConfigError(f"{key}.timesteps has {len(m.timesteps)} entries but steps "
                                  f"are {m.steps}: it is used for the entry of its length")
        if self.num_samples < 2:
            raise ConfigError("num_samples must be >= 2 (a covariance needs two samples)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not 0 <= self.grid_samples <= self.num_samples:
            raise ConfigError(f"grid_samples must lie in [0, num_samples={self.num_samples}]")
        if not self.detectors and self.clip is None:
            raise ConfigError("detectors is empty and no clip is set: nothing to measure")
        if len(set(self.detectors)) != len(self.detectors):
            raise ConfigError(f"detectors lists a name twice: {self.detectors}")
        r = self.reference
        if r.kind == "folder" and not r.images:
            raise ConfigError("reference.images: give the folder of reference images")
        if r.resolution is not None and r.resolution < 1:
            raise ConfigError("reference.resolution must be >= 1")
        if r.max_images is not None and r.max_images < 2:
            raise ConfigError("reference.max_images must be >= 2")
        if self.prompts.kind == "captions" and not (self.prompts.file or r.captions):
            raise ConfigError("prompts.kind=captions needs prompts.file or reference.captions")
        c = self.clip
        if c is not None and bool(c.detector) == bool(c.model):
            raise ConfigError("clip: set exactly one of clip.detector (a registered detector) "
                              "and clip.model (an open_clip model name, with clip.weights)")
        if self.dtype != "fp32" and self.device == "cpu":
            raise ConfigError(f"dtype={self.dtype} is for CUDA; use dtype=fp32 with device=cpu")


def _normalise_bench_dict(data: dict) -> dict:
    """YAML shorthands: ``reference: fashion_mnist_test`` and a reference mapping with
    ``images`` but no ``kind`` (a folder, e.g. COCO)."""
    data = dict(data)
    ref = data.get("reference")
    if isinstance(ref, str):
        data["reference"] = {"kind": ref}
    elif isinstance(ref, dict) and "kind" not in ref and ref.get("images"):
        data["reference"] = {**ref, "kind": "folder"}
    return data


def load_bench_config(path, overrides: Sequence[str] = ()) -> BenchConfig:
    """A bench YAML plus dotted ``key=value`` overrides, validated (ConfigError names the key)."""
    from diffdistill.config import (
        build_config,
        deep_merge,
        find_config,
        load_yaml,
        parse_overrides,
    )

    data = _normalise_bench_dict(load_yaml(find_config(path)))  # or a packaged bench/NAME
    data = deep_merge(data, _normalise_bench_dict(parse_overrides(list(overrides))))
    return build_config(BenchConfig, data)


# ----------------------------------------------------------------------------- prompts


def read_captions(path) -> list[str]:
    """Captions, in order, from ``.txt`` (one per line), ``.jsonl`` (a string or an object with
    caption / text / prompt per line), a JSON list, or COCO annotations (first caption of each
    image, ascending image id)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"captions file {p} does not exist")
    text = p.read_text(encoding="utf-8")

    def pick(item) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            for key in ("caption", "text", "prompt"):
                if isinstance(item.get(key), str):
                    return item[key]
        raise ValueError(f"{p}: cannot read a caption from {str(item)[:80]!r}")

    if p.suffix == ".jsonl":
        out = [pick(json.loads(line)) for line in text.splitlines() if line.strip()]
    elif p.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "annotations" in data:
            first: dict = {}
            for ann in data["annotations"]:
                first.setdefault(int(ann["image_id"]), ann["caption"])
            out = [first[k] for k in sorted(first)]
        elif isinstance(data, list):
            out = [pick(item) for item in data]
        else:
            raise ValueError(f"{p}: expected a JSON list or COCO annotations")
    else:
        out = [line.strip() for line in text.splitlines() if line.strip()]
    return [c.strip() for c in out]


@dataclass
class EvalPrompts:
    """Prompt ``i`` of an evaluation: ``captions[i]``, or the world's class ``i % 10`` with
    caption template ``template`` (text models) / label ``i % num_classes`` (pixel models)."""

    captions: list[str] | None = None
    template: int = 0

    def caption(self, i: int) -> str:
        from diffdistill.data import caption_for_class

        if self.captions is not None:
            return self.captions[i]
        return caption_for_class(i % 10, self.template)

    def label(self, i: int, num_classes: int) -> int:
        if self.captions is not None:
            raise ValueError("a class-conditional pixel model takes class labels, not captions: "
                             "use prompts.kind=classes")
        return i % num_classes

    def clip_caption(self, i: int, backbone) -> str | None:
        """The text CLIP compares sample i with (None: no CLIP score for this model)."""
        if backbone.kind != "pixel":
            return self.caption(i)
        if self.captions is None and backbone.num_classes == 10:  # the world's classes
            return self.caption(i)
        return None


def build_eval_prompts(cfg: BenchConfig) -> EvalPrompts:
    file = cfg.prompts.file or cfg.reference.captions
    kind = cfg.prompts.kind
    if kind == "auto":
        kind = "captions" if file else "classes"
    if kind == "classes":
        return EvalPrompts(template=cfg.prompts.template)
    captions = read_captions(file)
    if len(captions) < cfg.num_samples:
        raise ConfigError(f"prompts: {file} holds {len(captions)} captions but num_samples="
                          f"{cfg.num_samples}; give at least as many captions (or lower "
                          "num_samples)")
    return EvalPrompts(captions=captions[:cfg.num_samples])


# ----------------------------------------------------------------------------- models


@dataclass
class EvalModel:
    """A generator as the harness samples it: the denoiser (LCM boundary already applied
    where the sampler needs it), its backbone (conditioning, decoding), the sampler and
    guidance. ``guidance_embedding``: the width of an LCM w-embedding (``time_cond_proj_dim``)
    — w = guidance_scale − 1 then enters as ``timestep_cond`` and no CFG pass runs.
    ``timesteps(steps)`` may give a grid (None: the sampler's default)."""

    name: str
    backbone: Any
    denoiser: Any
    sampler: str
    guidance_scale: float = 1.0
    guidance_embedding: int | None = None
    timesteps: Callable[[int], Any] | None = None
    sampler_opts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def grid_for(self, steps: int) -> torch.Tensor:
        from diffdistill.sampling import default_timesteps

        if self.timesteps is not None:
            ts = self.timesteps(steps)
            if ts is not None:
                return torch.as_tensor(ts, dtype=torch.float64)
        ts = default_timesteps(self.sampler, self.denoiser.schedule, steps)
        if len(ts) != steps:
            raise ValueError(f"model {self.name!r}: sampler {self.sampler!r} runs {len(ts)} "
                             f"step(s), but {steps} were asked for")
        return ts.to(torch.float64)

    @property
    def cfg_active(self) -> bool:
        return self.guidance_scale != 1.0 and self.guidance_embedding is None

    def cond(self, prompts: EvalPrompts, indices: Sequence[int]):
        """Conditioning for samples ``indices`` (their global positions)."""
        from diffdistill.denoiser import Cond, guidance_scale_embedding

        bb = self.backbone
        if bb.kind == "pixel":
            cond = None
            if bb.num_classes is not None:
                labels = [prompts.label(i, bb.num_classes) for i in indices]
                cond = bb.class_cond(labels, guidance=self.cfg_active)
        else:
            cond = bb.encode_prompts([prompts.caption(i) for i in indices],
                                     with_uncond=self.cfg_active)
        if self.guidance_embedding:
            w = torch.tensor([self.guidance_scale - 1.0])
            row = guidance_scale_embedding(w, self.guidance_embedding).to(bb.device)
            cond = (cond or Cond()).replace(timestep_cond=row.expand(len(indices), -1))
        return cond


def load_eval_model(spec: BenchModel, *, device="cpu", dtype: torch.dtype = torch.float32
                    ) -> EvalModel:
    """Load a bench model entry (full folder, or base + LoRA) the way ``diffdistill sample``
    does: ``choose_sampler`` picks the export's recorded sampler, the recorded timesteps are
    used for the recorded step count (``timesteps_by_steps``: for further step counts), its
    ``sampler_opts`` are passed on, the recorded guidance (and TCD gamma) when the entry
    gives none, consistency samplers get the LCM boundary, and a UNet with a guidance
    embedding (``time_cond_proj_dim``) gets w = guidance − 1 instead of CFG."""
    from diffdistill.backbone import load_backbone
    from diffdistill.denoiser import LCMConsistency
    from diffdistill.export import choose_sampler, load_lora_into
    from diffdistill.world import resolve_model_path

    path = Path(resolve_model_path(spec.path))
    lora_dir = Path(spec.lora) if spec.lora else None
    bb = load_backbone(str(path), dtype=dtype, device=device)
    if lora_dir is not None:
        load_lora_into(bb.unet, lora_dir)
    bb.unet.requires_grad_(False).eval()
    sampler, info = choose_sampler(spec.sampler, path, lora_dir,
                                   bb.scheduler_config.get("_class_name", ""))
    model = bb.denoiser()
    if sampler in ("lcm", "onestep") and bb.prediction_type != "cm":
        model = LCMConsistency(model)
    w_dim = getattr(bb.unet.config, "time_cond_proj_dim", None)
    embed = w_dim if (bb.kind != "pixel" and w_dim is not None) else None
    guidance = (spec.guidance_scale if spec.guidance_scale is not None
                else float(info.get("guidance_scale", 1.0)))
    opts = bb.sampler_options(sampler)
    if sampler == "tcd" and "gamma" in info:
        opts["gamma"] = float(info["gamma"])
    opts.update(info.get("sampler_opts", {}))
    opts.update(spec.sampler_opts)
    grids = {}
    if info.get("timesteps"):
        grids[len(info["timesteps"])] = list(info["timesteps"])
    for ts in info.get("timesteps_by_steps", {}).values():  # more trained grids (iCT 2-step)
        grids[len(ts)] = list(ts)
    if spec.timesteps:
        grids[len(spec.timesteps)] = list(spec.timesteps)
    return EvalModel(name=spec.name, backbone=bb, denoiser=model, sampler=sampler,
                     guidance_scale=guidance, guidance_embedding=embed,
                     timesteps=grids.get, sampler_opts=opts, info=info)


def recorded_step_counts(info: dict) -> list[int]:
    """The step counts a bench entry without ``steps`` runs: every count a unified export
    serves (Hyper-SD's ``served_steps``), else its recorded count, else 4."""
    served = info.get("served_steps")
    if served:
        return [int(s) for s in served]
    return [int(info.get("steps", 4))]


# ----------------------------------------------------------------------------- distributed


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


def _ranges(values: Sequence[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]] (half-open runs)."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


# ----------------------------------------------------------------------------- memory


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` that live on a GPU."""
    total = 0
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_cuda:
                    total += t.numel() * t.element_size()
    return total


class _PeakMemory:
    """Peak memory of generation only (``with memory: generate...``; feature extraction is
    outside). CUDA: ``max_memory_allocated`` during generation (the generator's weights
    included) minus the resident evaluation networks (``exclude``). CPU: how far the resident
    set grew above its size when generation started — sampled every few ms from
    ``/proc/self/statm``, and never less than the growth of ``getrusage``'s lifetime peak
    (which catches spikes between samples but reads 0 whenever an earlier peak was higher)."""

    def __init__(self, device: torch.device, exclude: Sequence = (), interval: float = 0.005):
        import threading

        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss_delta"
        self.peak = 0
        self.exclude = _cuda_bytes(exclude) if self.cuda else 0
        self._active = False
        self._stop = threading.Event()
        self._thread = None
        if not self.cuda and _current_rss_bytes() is not None:
            def poll():
                while not self._stop.wait(interval):
                    if self._active:
                        self.highest = max(self.highest, _current_rss_bytes() or 0)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.start_peak = _peak_rss_bytes()
            self.start = self.highest = _current_rss_bytes() or 0
            self._active = True
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            used = torch.cuda.max_memory_allocated(self.device) - self.exclude
        else:
            self._active = False
            self.highest = max(self.highest, _current_rss_bytes() or 0)
            used = max(self.highest - self.start, _peak_rss_bytes() - self.start_peak)
        self.peak = max(self.peak, int(used))
        return False

    def close(self) -> int:
        """Stop the sampling thread; the peak over every ``with`` block, in bytes."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return max(self.peak, 0)


# ----------------------------------------------------------------------------- generation


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
    peak_memory_bytes: int  # max over processes
    peak_memory_kind: str

    @property
    def sec_per_image(self) -> float:
        return self.gen_seconds / max(self.count, 1)


@torch.no_grad()
def generate_for_eval(model: EvalModel, seeds: Sequence[int], *, num_steps: int,
                      prompts: EvalPrompts | None = None, detectors: Sequence = (),
                      clip=None, clip_prefix: str = "", resolution: int | None = None,
                      batch_size: int = 16, grid_samples: int = 0, accelerator=None,
                      progress: bool = False, warmup: bool = False,
                      autocast_dtype: torch.dtype | None = None) -> EvalGeneration:
    """Generate sample ``i`` with seed ``seeds[i]`` and prompt ``i`` for every i, this rank's
    share only (:func:`shard_batches`), and measure it: features of every detector in
    all-reduced ``FeatureStats``, the CLIP score (mean cosine) when ``clip`` is given, the
    first ``grid_samples`` images gathered, generation seconds and peak memory. Every rank
    must call it (collectives)."""
    from diffdistill.eval.clip_score import clip_score
    from diffdistill.eval.fid import FeatureStats
    from tqdm.auto import tqdm

    from diffdistill.backbone import grid_shape
    from diffdistill.sampling import generate

    rank, world = _rank_world(accelerator)
    prompts = prompts or EvalPrompts()
    seeds = [int(s) for s in seeds]
    bb = model.backbone
    device = bb.device
    ts = model.grid_for(num_steps)
    shape = grid_shape(bb, bb.resolution)
    decode = None if bb.kind == "pixel" else bb.decode_latents
    sampler_gs = model.guidance_scale if model.cfg_active else 1.0

    def run(indices: list[int]) -> torch.Tensor:
        return generate(model.denoiser, seeds=[seeds[i] for i in indices], shape=shape,
                        cond_fn=lambda sl: model.cond(prompts, indices[sl]),
                        sampler=model.sampler, num_steps=len(ts), timesteps=ts,
                        guidance_scale=sampler_gs, batch_size=len(indices), decode=decode,
                        output="uint8", progress=False, autocast_dtype=autocast_dtype,
                        sampler_opts=model.sampler_opts, device=device)

    batches = shard_batches(len(seeds), batch_size, rank, world)
    meta_res = resolution if resolution is not None else "native"
    stats = {d.name: FeatureStats.for_detector(d, resolution=meta_res,
                                               source=f"generated:{model.name}")
             for d in detectors}
    if warmup and batches:
        run(list(batches[0]))
    memory = _PeakMemory(device, exclude=[*detectors, clip])
    gen_seconds, clip_sum, clip_n = 0.0, 0.0, 0
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
                _sync(device)
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
                stats[d.name].update(d(eval_images))
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
                             "grid": grid_items, "peak": peak}, world)
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
        peak_memory_bytes=max(p["peak"] for p in parts), peak_memory_kind=memory.kind)


# ----------------------------------------------------------------------------- reference


def _world_stats_file(detector_name: str) -> Path | None:
    """The embedded world's shipped test-split statistics for this detector, if present."""
    try:
        from diffdistill.world import REF_STATS, ref_stats_path
    except ImportError:  # pragma: no cover - the world is part of the package
        return None
    for key, name in REF_STATS.items():
        if name == detector_name:
            path = ref_stats_path(key)
            return path if path.is_file() else None
    return None


def _eval_resolution(ref: BenchReference) -> int | None:
    if ref.resolution is not None:
        return int(ref.resolution)
    return 32 if ref.kind == "fashion_mnist_test" else None


def reference_count(ref: BenchReference) -> int:
    """How many reference images the statistics are computed from."""
    if ref.kind == "fashion_mnist_test":
        from diffdistill.data import load_fashion_mnist

        n = len(load_fashion_mnist("test", ref.fmnist_root or None)[1])
    else:
        from diffdistill.eval.fid import _list_images

        folder = Path(ref.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference.images: folder {folder} does not exist")
        n = len(_list_images(folder))
    return n if ref.max_images is None else min(n, ref.max_images)


def _check_reference_size(count: int, num_samples: int, ref: BenchReference, what: str,
                          fix: str = "Add reference images, lower num_samples, or set "
                                     "reference.allow_fewer=true to evaluate anyway") -> None:
    if count < num_samples and not ref.allow_fewer:
        raise ConfigError(
            f"reference: {what} has {count} images but num_samples={num_samples}; a Fréchet "
            "distance against a smaller reference set is not comparable with published "
            f"numbers. {fix}")


def reference_statistics(detector, ref: BenchReference, *, cache_dir=None,
                         accelerator=None, batch_size: int = 64, progress: bool = False):
    """The reference ``FeatureStats`` for ``detector``: a precomputed file from
    ``ref.stats`` (its extractor, resize mode and resolution must match, else refused), the
    embedded world's shipped file when it is of exactly this kind, or computed (and cached in
    ``cache_dir``) with :func:`diffdistill.eval.fid.reference_stats`."""
    from diffdistill.eval.fid import FeatureStats, reference_stats

    res = _eval_resolution(ref)
    expected = {"extractor": detector.name, "resize_mode": detector.resize_mode,
                "resolution": res if res is not None else "native"}
    if detector.name in ref.stats:
        return FeatureStats.load(ref.stats[detector.name], **expected)
    if ref.kind == "fashion_mnist_test":
        shipped = _world_stats_file(detector.name)
        if shipped is not None and ref.max_images is None:
            try:
                return FeatureStats.load(shipped, source=FMNIST_SOURCE, **expected)
            except ValueError as e:
                log.info("not using the shipped statistics: %s", e)
        from diffdistill.data import fashion_mnist_uint8

        images = fashion_mnist_uint8("test", res, root=ref.fmnist_root or None,
                                     limit=ref.max_images)
        return reference_stats(detector, images, cache_dir, source_id=FMNIST_SOURCE,
                               resolution=res, batch_size=batch_size, progress=progress,
                               accelerator=accelerator)
    return reference_stats(detector, ref.images, cache_dir, resolution=res,
                           max_count=ref.max_images, batch_size=batch_size, progress=progress,
                           accelerator=accelerator)


# ----------------------------------------------------------------------------- bench


def _import_plugins(modules: Sequence[str]) -> None:
    import diffdistill.world  # noqa: F401  (registers the world's detectors, lazily)

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r} ({e})") from None


def _build_detector(name: str, options: dict, device):
    from diffdistill.eval.features import get_detector

    try:
        return get_detector(name, device=device, **dict(options.get(name) or {}))
    except KeyError as e:
        raise ConfigError(f"detectors: {e.args[0]}") from None


def _build_clip(c: BenchClip | None, options: dict, device):
    if c is None:
        return None
    if c.detector:
        return _build_detector(c.detector, options, device)
    from diffdistill.eval.features import ClipDetector

    return ClipDetector(c.model, pretrained_path=c.weights or None,
                        config_path=c.config or None, device=device)


def _accelerator(cfg: BenchConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    return Accelerator(cpu=cpu)


def _protocol(cfg: BenchConfig, prompts: EvalPrompts, ref_count: int, detectors, clip) -> dict:
    from diffdistill.eval.fid import metric_name

    r = cfg.reference
    res = _eval_resolution(r)
    if r.kind == "fashion_mnist_test":
        ref_text = (f"Fashion-MNIST test split ({ref_count} images, padded to 32 px"
                    + (f", resized to {res} px)" if res != 32 else ")"))
    else:
        ref_text = f"{ref_count} images from {r.images}"
    if res is not None and r.kind == "folder":
        ref_text += f", centre-cropped and LANCZOS-resized to {res} px"
    prompts_text = (f"captions file {cfg.prompts.file or r.captions} (first {cfg.num_samples})"
                    if prompts.captions is not None else
                    f"world classes: sample i uses class i % 10 (template {prompts.template}) "
                    "or label i % num_classes")
    return {
        "num_samples": cfg.num_samples,
        "seeds": [cfg.seeds_start, cfg.seeds_start + cfg.num_samples],
        "prompts": prompts_text,
        "reference": ref_text,
        "reference_count": ref_count,
        "evaluation_resolution": res,
        "fd": {metric_name(d): f"Fréchet distance on {d.name} features ({d.resize_mode} resize)"
               for d in detectors},
        "clip_score": (None if clip is None else
                       f"mean cosine similarity (scale 1, unclamped) of {clip.name} image and "
                       f"caption embeddings{' with prefix ' + repr(cfg.clip.prefix) if cfg.clip.prefix else ''}"),
        "sec_per_image": "generation only (sampler + decode), after one warm-up batch, "
                         "summed over processes / N" if cfg.warmup else
                         "generation only (sampler + decode), no warm-up, summed over "
                         "processes / N",
        "peak_memory": "during generation only; cuda_max_allocated: "
                       "torch.cuda.max_memory_allocated (the generator's weights included, "
                       "the evaluation networks not); cpu_peak_rss_delta: how far the "
                       "process's resident set grew (weights already loaded not counted)",
        "batch_size": cfg.batch_size,
    }


def _check_model_paths(cfg: BenchConfig) -> None:
    """Every model folder and LoRA folder exists (one line naming the entry, else)."""
    from diffdistill.world import resolve_model_path

    for i, m in enumerate(cfg.models):
        for key, value in (("path", m.path), ("lora", m.lora)):
            if value and not Path(resolve_model_path(value)).exists():
                raise ConfigError(f"models[{i}].{key}={value!r} ({m.name}) does not exist")


def run_bench(cfg: BenchConfig, *, accelerator=None, command: str | None = None):
    """Evaluate every model × steps of ``cfg``; rank 0 writes the report into ``cfg.out``.
    Returns :class:`diffdistill.eval.report.BenchResults` (on every rank)."""
    from diffdistill.eval.fid import fid_from_stats, metric_name
    from diffdistill.eval.report import BenchResults, BenchRow, machine_info, write_report

    _import_plugins(cfg.imports)
    acc = accelerator or _accelerator(cfg)
    device = acc.device
    if cfg.dtype != "fp32" and device.type != "cuda":
        raise ConfigError(f"dtype={cfg.dtype} needs CUDA (this run is on {device}); "
                          "set dtype=fp32")
    out = Path(cfg.out)
    prompts = build_eval_prompts(cfg)
    ref = cfg.reference
    ref_count = reference_count(ref)
    _check_reference_size(ref_count, cfg.num_samples, ref,
                          "the Fashion-MNIST test split" if ref.kind == "fashion_mnist_test"
                          else f"reference.images {ref.images}")
    _check_model_paths(cfg)  # before minutes of reference features
    res = _eval_resolution(ref)
    detectors = [_build_detector(n, cfg.detector_options, device) for n in cfg.detectors]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "ref_stats"
    refs = {}
    for d in detectors:
        refs[d.name] = reference_statistics(d, ref, cache_dir=cache, accelerator=acc,
                                            batch_size=cfg.batch_size,
                                            progress=cfg.progress and acc.is_main_process)
        _check_reference_size(refs[d.name].count, cfg.num_samples, ref,
                              f"the {d.name} reference statistics")
    clip = _build_clip(cfg.clip, cfg.detector_options, device)
    metrics = [metric_name(d) for d in detectors] + (["CLIP score"] if clip is not None else [])
    seeds = list(range(cfg.seeds_start, cfg.seeds_start + cfg.num_samples))
    autocast = _DTYPES[cfg.dtype] if (cfg.dtype != "fp32" and device.type == "cuda") else None
    rows, grid_rows = [], []
    for spec in cfg.models:
        model = load_eval_model(spec, device=device, dtype=_DTYPES[cfg.dtype])
        for steps in spec.steps or recorded_step_counts(model.info):
            gen = generate_for_eval(model, seeds, num_steps=steps, prompts=prompts,
                                    detectors=detectors, clip=clip,
                                    clip_prefix=cfg.clip.prefix if cfg.clip else "",
                                    resolution=res, batch_size=cfg.batch_size,
                                    grid_samples=cfg.grid_samples, accelerator=acc,
                                    progress=cfg.progress, warmup=cfg.warmup,
                                    autocast_dtype=autocast)
            values = {metric_name(d): fid_from_stats(gen.stats[d.name], refs[d.name])
                      for d in detectors}
            if clip is not None:
                values["CLIP score"] = gen.clip_score
            rows.append(BenchRow(
                model=spec.name, steps=steps, sampler=model.sampler,
                guidance_scale=model.guidance_scale, timesteps=gen.timesteps,
                num_samples=gen.count, metrics=values, sec_per_image=gen.sec_per_image,
                peak_memory_mb=gen.peak_memory_bytes / 2**20,
                peak_memory_kind=gen.peak_memory_kind, path=spec.path, lora=spec.lora,
                seed_ranges_by_rank=[_ranges(s) for s in gen.seeds_by_rank]))
            grid_rows.append(gen.grid)
            if acc.is_main_process:
                log.info("%s @ %d step(s): %s, %.4f s/img", spec.name, steps,
                         ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a"
                                   for k, v in values.items()), gen.sec_per_image)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from diffdistill.config import config_to_dict

    results = BenchResults(
        rows=rows, metrics=metrics, protocol=_protocol(cfg, prompts, ref_count, detectors, clip),
        machine=machine_info(device, acc.num_processes),
        command=command if command is not None else " ".join(sys.argv),
        config=config_to_dict(cfg), grid_seeds=seeds[:cfg.grid_samples])
    if acc.is_main_process:
        write_report(results, grid_rows if cfg.grid_samples else None, out)
        from diffdistill.eval.convergence import collect, training_run_of, write_convergence

        runs = {m.name: training_run_of(m.lora or m.path) for m in cfg.models}
        curves = collect({k: v for k, v in runs.items() if v is not None})
        if curves:  # students exported by a run with periodic evals: how they got there
            write_convergence(curves, out)
        from diffdistill.eval.html_report import write_bench_html

        write_bench_html(results, out)
    acc.wait_for_everyone()
    return results


def bench_command(config: str, overrides: Sequence[str] = ()) -> int:
    """``diffdistill bench BENCH.yaml [key=value ...]``."""
    cfg = load_bench_config(config, overrides)
    results = run_bench(cfg, command=" ".join(["diffdistill bench", config, *overrides]))
    print(f"wrote {len(results.rows)} rows to {Path(cfg.out) / 'results.md'}")
    return 0


# ----------------------------------------------------------------------------- trainer


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _quick_reference(spec: str, detector_name: str, resolution: int) -> BenchReference:
    """``eval.reference``: fashion_mnist_test, a folder of images, or a FeatureStats .npz."""
    p = Path(spec)
    if spec == "fashion_mnist_test":
        return BenchReference(resolution=resolution)
    if p.suffix == ".npz":
        return BenchReference(resolution=resolution, stats={detector_name: str(p)})
    return BenchReference(kind="folder", images=str(p), resolution=resolution)


def quick_eval(trainer, spec: EvalModel) -> dict[str, float]:
    """The Trainer's periodic metric (``cfg.eval``): ``num_samples`` images from seeds
    0..N−1 per step count in ``eval.steps``, Fréchet distance on ``eval.detector`` against the
    reference at ``data.resolution``. Returns e.g. ``{"eval/fid_fmnist_1step": ...}``. The
    detector and the reference statistics are built once per trainer."""
    from diffdistill.eval.fid import fid_from_stats, metric_name

    e = trainer.cfg.eval
    cache = trainer.__dict__.setdefault("_quick_eval_cache", {})
    if "detector" not in cache:
        _import_plugins(())
        det = _build_detector(e.detector, {}, trainer.device)
        ref = _quick_reference(e.reference, det.name, trainer.cfg.data.resolution)
        stats = reference_statistics(det, ref, cache_dir=Path(trainer.out) / "eval_cache",
                                     accelerator=trainer.accelerator)
        _check_reference_size(stats.count, e.num_samples, ref, f"eval.reference {e.reference}",
                              fix="Lower eval.num_samples or use a larger eval.reference")
        cache.update(detector=det, reference=stats)
    det, ref_stats = cache["detector"], cache["reference"]
    seeds = list(range(e.num_samples))
    label = _slug(metric_name(det))
    out = {}
    for steps in e.steps:
        gen = generate_for_eval(spec, seeds, num_steps=steps, detectors=[det],
                                resolution=trainer.cfg.data.resolution,
                                batch_size=min(64, len(seeds)), accelerator=trainer.accelerator)
        out[f"eval/{label}_{steps}step"] = fid_from_stats(gen.stats[det.name], ref_stats)
    return out
