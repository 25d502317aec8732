"""The embedded tiny world (Fashion-MNIST, three teachers, metric networks).

A miniature of the real use case that runs the same code paths as Stable Diffusion 1.5 on
two CPU cores, shipped as fp16 safetensors in ``diffdistill/world/assets/``:

=============================  ===========================================================
``teacher_latent/``            ``StableDiffusionPipeline`` folder (``world:teacher_latent``):
                               tiny AutoencoderKL (32×32 px ↔ 8×8×4 latents), CLIP tokenizer
                               from open_clip's BPE, tiny CLIPTextModel (random, frozen),
                               UNet2DConditionModel, DDIM scheduler (SD1.5's config), ε.
``teacher_pixel/``             ``DDPMPipeline``-style folder (``world:teacher_pixel``):
                               class-conditional UNet2DModel at 32×32 px, 10 classes + null
                               class 10 for CFG, DDPMScheduler (linear β, v-prediction).
``teacher_flow/``              ``StableDiffusion3Pipeline`` folder (``world:teacher_flow``):
                               rectified flow; tiny SD3Transformer2DModel (MMDiT) on the
                               latent teacher's VAE latents, two tiny CLIP text encoders with
                               projection on a character-level tokenizer, no T5,
                               FlowMatchEulerDiscreteScheduler (shift 1).
``fmnist_net.safetensors``     Fashion-MNIST classifier, detector ``"fmnist-net"`` →
                               "FID-FMNIST" (:mod:`diffdistill.world.classifier`).
``clip/``                      tiny open_clip model (:mod:`diffdistill.world.clip`): the
                               reward of RG-LCD / Hyper-SD in the toy configs.
``clip_judge/``                the independent CLIP judge (``"world-clip-judge"``): another
                               architecture, seed and image set; what the bench scores with.
``ref_stats/*.npz``            test-split feature statistics per extractor
                               (``diffdistill.eval.fid.FeatureStats``); ``*_val.npz``:
                               the validation images' (training images 50000–59999).
``world.json``                 what was built: command, seeds, CPU time per stage, metrics.
=============================  ===========================================================

Everything is produced by ``diffdistill world build`` (:mod:`diffdistill.app.world_build`).
Importing this package registers the ``"fmnist-net"``, ``"world-clip"`` and
``"world-clip-judge"`` detectors in
``diffdistill.eval.features`` (lazily: the networks load on first use).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: environment variable naming another world folder (e.g. a ``--scale tiny`` build for tests)
WORLD_DIR_ENV = "DIFFDISTILL_WORLD_DIR"

TEACHERS = ("teacher_latent", "teacher_pixel", "teacher_flow")
#: ref_stats file stem -> detector registry name
REF_STATS = {"fmnist-net": "fmnist-net", "clip": "world-clip"}
#: the splits shipped for each: the test split (reports) and the validation images (choices)
REF_SPLITS = ("test", "val")
#: the build's stages, in order (:mod:`diffdistill.app.world_build` runs them)
STAGES = ("classifier", "clip", "ref_stats", "vae", "teacher_pixel", "teacher_latent",
          "clip_judge", "teacher_flow", "report")
SIZE_BUDGET_BYTES = 25 * 1000 * 1000  # "≤ 25 MB" for everything shipped


def world_dir() -> Path:
    """The world in use: ``$DIFFDISTILL_WORLD_DIR`` when set, else the shipped assets.
    ``world:NAME`` model paths, the ``fmnist-net`` / ``world-clip`` detectors and the
    shipped reference statistics all resolve through it."""
    env = os.environ.get(WORLD_DIR_ENV)
    return Path(env) if env else ASSETS_DIR


def asset_path(name: str, assets: Optional[Union[str, Path]] = None) -> Path:
    """Path of a world asset (``teacher_latent``, ``clip``, ``fmnist_net.safetensors``...)."""
    return Path(assets or world_dir()) / name


def resolve_model_path(path: str) -> str:
    """``world:NAME`` → the embedded world's folder NAME (``diffdistill/world/assets/NAME``, or
    under ``$DIFFDISTILL_WORLD_DIR``); any other path unchanged."""
    from diffdistill.config import ConfigError

    if path.startswith("world:"):
        folder = asset_path(path[len("world:"):])
        if not folder.exists():
            raise ConfigError(f"model.path={path!r}: the embedded world has no {folder.name!r} "
                              "(build it with `diffdistill world build`)")
        return str(folder)
    if not path:
        raise ConfigError("model.path is empty: give a local diffusers folder (or world:NAME)")
    return path


def world_info(assets: Optional[Union[str, Path]] = None) -> dict:
    """Contents of ``world.json`` (raises FileNotFoundError when the world is not built)."""
    path = asset_path("world.json", assets)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the embedded world with "
                                "`diffdistill world build`")
    return json.loads(path.read_text())


def ref_stats_path(key: str, assets: Optional[Union[str, Path]] = None,
                   split: str = "test") -> Path:
    """``ref_stats/<key>.npz`` (test split) or ``ref_stats/<key>_val.npz`` (the validation
    images, :data:`diffdistill.fmnist.VAL_RANGE`); key in :data:`REF_STATS`."""
    if key not in REF_STATS:
        raise KeyError(f"unknown reference statistics {key!r}; choose from {sorted(REF_STATS)}")
    if split not in REF_SPLITS:
        raise KeyError(f"unknown reference split {split!r}; choose from {REF_SPLITS}")
    return asset_path("ref_stats", assets) / f"{key}{'' if split == 'test' else '_' + split}.npz"


def load_ref_stats(key: str, assets: Optional[Union[str, Path]] = None, split: str = "test",
                   **expected):
    """The shipped statistics of one split (a ``FeatureStats``); ``expected`` metadata is
    checked (e.g. ``extractor="fmnist-net"``)."""
    from diffdistill.eval.fid import FeatureStats

    return FeatureStats.load(ref_stats_path(key, assets, split), **expected)


def save_safetensors_fp16(state: dict, path: Union[str, Path],
                          metadata: Optional[dict] = None) -> Path:
    """Write ``state`` with floating tensors cast to fp16 (integer buffers kept), atomically
    and world-readable (safetensors itself creates files with mode 0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fresh_tmp(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def cast_safetensors_fp16(folder: Path) -> list[Path]:
    """Rewrite every ``*.safetensors`` under ``folder`` with floating tensors in fp16."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    done = []
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata() or {}
        done.append(save_safetensors_fp16(load_file(str(f)), f, meta))
    return done


def fmnist_detector(weights_path=None, device=None):
    """The ``"fmnist-net"`` detector (FID-FMNIST) with the shipped weights."""
    from .classifier import FMNISTDetector

    return FMNISTDetector(weights_path=weights_path, device=device)


def world_clip_detector(folder=None, device=None, **kw):
    """The world CLIP as a ``ClipDetector`` (CLIP score / reward)."""
    from .clip import clip_detector

    return clip_detector(folder, device=device, **kw)


def world_clip_judge_detector(folder=None, device=None, **kw):
    """The world's independent CLIP judge (``clip_judge/``) as a ``ClipDetector``: the
    default CLIP score of ``diffdistill bench`` on the world (never a reward)."""
    from .clip import clip_detector

    return clip_detector(folder or asset_path("clip_judge"), device=device, **kw)


def _register_detectors() -> None:
    try:
        from diffdistill.eval.features import available_detectors, register_detector
    except ImportError:  # pragma: no cover - eval is part of the package
        return
    have = set(available_detectors())
    if "fmnist-net" not in have:
        register_detector("fmnist-net", fmnist_detector)
    if "world-clip" not in have:
        register_detector("world-clip", world_clip_detector)
    if "world-clip-judge" not in have:
        register_detector("world-clip-judge", world_clip_judge_detector)


_register_detectors()


def epoch_batches(n: int, batch_size: int, steps: int, generator):
    """``(step, indices)`` for ``steps`` minibatches of the world's small training loops
    (classifier, VAE, CLIP): a fresh permutation of ``n`` items from ``generator`` each epoch,
    drawn just before the epoch's first batch; a partial last batch is dropped."""
    import torch

    bs = min(batch_size, n)
    per_epoch = n // bs
    perm = None
    for step in range(steps):
        pos = step % per_epoch
        if pos == 0:
            perm = torch.randperm(n, generator=generator)
        yield step, perm[pos * bs:(pos + 1) * bs]


def warmup_cosine(optimizer, steps: int):
    """The LR schedule of the world's small training loops (classifier, VAE, CLIP): linear
    warm-up over the first 5% of ``steps``, then cosine decay to 0."""
    import math

    import torch

    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
