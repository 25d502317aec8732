"""``diffdistill bench`` configuration: the models to evaluate, prompts, the reference set,
the detectors and the CLIP judge (YAML, validated; dotted ``key=value`` overrides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from diffdistill.config import ConfigError


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
    # fashion_mnist_test reports results; fashion_mnist_val (training images 50000-59999)
    # is for choosing knobs and checkpoints; folder: your own images
    kind: Literal["fashion_mnist_test", "fashion_mnist_val", "folder"] = "fashion_mnist_test"
    images: str = ""  # folder: reference images (sorted, recursive)
    captions: str = ""  # folder: the captions the models are prompted with (COCO)
    resolution: int | None = None  # evaluation resolution (Fashion-MNIST kinds: 32)
    max_images: int | None = None  # use only the first N reference images
    fmnist_root: str = ""  # Fashion-MNIST IDX folder (default: $DIFFDISTILL_FMNIST, Debian's)
    stats: dict = field(default_factory=dict)  # detector name -> precomputed FeatureStats .npz
    allow_fewer: bool = False  # evaluate even with fewer reference images than samples


@dataclass
class BenchClip:
    # a registered detector (e.g. world-clip-judge); "auto": the world's independent judge
    # when the reference is the Fashion-MNIST test split, else no CLIP score
    detector: str = ""
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
    clip: BenchClip | None = field(default_factory=lambda: BenchClip(detector="auto"))  # null: none
    # improved precision / recall (Kynkäänniemi et al. 2019) on the first detector's features,
    # N samples against the first N reference images, k nearest neighbours
    precision_recall: bool = True
    precision_recall_k: int = 3
    out: str = "runs/bench"
    cache_dir: str | None = None  # reference statistics cache (default OUT/ref_stats)
    grid_samples: int = 8  # grid columns: the first seeds, the same for every row
    warmup: bool = True  # one untimed batch before timing (always with compile)
    compile: bool = False  # torch.compile each generator's network (CPU inductor or CUDA)
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
        if self.precision_recall and not self.detectors:
            raise ConfigError("precision_recall needs a detector (its feature space); list "
                              "one in detectors or set precision_recall=false")
        if self.precision_recall and not 1 <= self.precision_recall_k < self.num_samples:
            raise ConfigError(f"precision_recall_k must lie in [1, num_samples), got "
                              f"{self.precision_recall_k}")
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

