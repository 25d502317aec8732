"""Feature extractors ("detectors") for distribution metrics, behind one protocol.

A detector maps uint8 NCHW RGB images of any size to float32 ``[N, D]`` features and does
its own resizing and normalisation, so a metric never has to know which network it uses
(the shape of NVlabs/edm2 ``calculate_metrics.py``).

This module holds what every detector shares: the :class:`Detector` protocol, the registry
(:func:`register_detector`, :func:`get_detector`, :func:`available_detectors`), uint8 input
coercion (:func:`to_uint8_rgb`), resizing (:func:`resize_uint8`) and the resize-and-normalise
step built on them (:func:`prepare_uint8`), weight-file loading, the :class:`FrozenModule`
base of evaluation networks, and batched extraction (:func:`iter_feature_batches`,
:func:`extract_features`).

Built-in detectors (registered by name; their modules are imported on first use)
--------------------------------------------------------------------------------
``"inception"`` / ``"inception-v3"``: :class:`~diffdistill.eval.inception.InceptionV3FID`
    The FID network (2048-d pool3 of the 2015 TF Inception-v3 graph).
``"effnet-lite0"``: :class:`~diffdistill.eval.effnet.EffNetLite0Detector`
    1280-d pooled ImageNet EfficientNet-Lite0 features; a Fréchet distance on it is
    **not** FID, report it as "FD-EffNetLite0".
``"clip"`` / ``"clip:<model>"``: :class:`~diffdistill.eval.clip_detector.ClipDetector`
    L2-normalised open_clip image embeddings (and text embeddings for CLIP score),
    preprocessed with open_clip's own evaluation transform.

Resizing conventions (``resize_uint8``)
---------------------------------------
``"clean"``
    clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
    Evaluation"): each channel of the uint8 image is converted to a float32 PIL image (mode
    "F") and resized with PIL's antialiased bicubic filter, the result is clipped to
    [0, 255] and is *not* re-quantised to uint8. This is what clean-fid's ``mode="clean"``
    feeds its Inception (``make_resizer("PIL", quantize_after=False, "bicubic")``), and the
    modern convention for reporting FID.
``"legacy"``
    torch-fidelity / the original TF1 FID code: bilinear resize inside the network with
    TensorFlow 1.x ``resize_bilinear(align_corners=False)`` sampling (source coordinate =
    ``dst * in/out``, no half-pixel offset, no antialiasing) on float 0..255 values. Use it to
    reproduce numbers from torch-fidelity or torchmetrics (``antialias=False``).

Both modes return float32 values in [0, 255]; detectors apply their own normalisation.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "CLIP_WEIGHTS_ENV",
    "EFFNET_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_ENV",
    "RESIZE_MODES",
    "ClipDetector",
    "Detector",
    "EffNetLite0",
    "EffNetLite0Detector",
    "FrozenModule",
    "InceptionV3FID",
    "available_detectors",
    "extract_features",
    "get_detector",
    "iter_feature_batches",
    "load_state_dict_file",
    "prepare_uint8",
    "register_detector",
    "resize_uint8",
    "to_uint8_rgb",
]

if TYPE_CHECKING:  # re-exported lazily below (the detector modules import this one)
    from diffdistill.eval.clip_detector import CLIP_WEIGHTS_ENV, ClipDetector
    from diffdistill.eval.effnet import EFFNET_WEIGHTS_ENV, EffNetLite0, EffNetLite0Detector
    from diffdistill.eval.inception import INCEPTION_WEIGHTS_ENV, InceptionV3FID

RESIZE_MODES = ("clean", "legacy")

# Names defined by the detector modules and re-exported here, imported on first access so
# that those modules can import this one: name -> module under diffdistill.eval.
_DETECTOR_MODULES = {
    "InceptionV3FID": "inception",
    "INCEPTION_WEIGHTS_ENV": "inception",
    "EffNetLite0": "effnet",
    "EffNetLite0Detector": "effnet",
    "EFFNET_WEIGHTS_ENV": "effnet",
    "ClipDetector": "clip_detector",
    "CLIP_WEIGHTS_ENV": "clip_detector",
}


def __getattr__(name: str):
    module = _DETECTOR_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffdistill.eval.{module}"), name)


def __dir__() -> list:
    return sorted(set(globals()) | set(_DETECTOR_MODULES))


@runtime_checkable
class Detector(Protocol):
    """uint8 NCHW RGB images (any H, W; 1 channel is replicated) -> float32 ``[N, D]``.

    Optional: ``metric_name`` — how a Fréchet distance on these features is reported
    ("FID" only for the Inception network; see ``diffdistill.eval.fid.metric_name``).
    """

    name: str
    feature_dim: int
    resize_mode: str

    def __call__(self, images_uint8_nchw: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------
# Input handling and resizing
# ----------------------------------------------------------------------------------------

def to_uint8_rgb(images: Any) -> torch.Tensor:
    """Coerce one image or a batch to a uint8 ``[N, 3, H, W]`` tensor.

    Accepts uint8 tensors (CHW or NCHW, 1 or 3 channels; a 4th alpha channel is dropped),
    uint8 numpy arrays (HW, HWC or NHWC) and PIL images. Float input is refused rather than
    guessed at: [0, 1] and [-1, 1] conventions both exist and silently picking one shifts FID.
    """
    if not torch.is_tensor(images):
        from PIL import Image

        if isinstance(images, Image.Image):
            images = np.array(images.convert("RGB"))
        if not isinstance(images, np.ndarray):
            raise TypeError(f"unsupported image type {type(images).__name__}")
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got numpy {images.dtype}")
        arr = images[:, :, None] if images.ndim == 2 else images
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4:
            raise ValueError(f"numpy images must be HW, HWC or NHWC, got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 images, got {images.dtype}; convert with "
            "(x * 255).round().clamp(0, 255).to(torch.uint8) for [0, 1] floats"
        )
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected CHW or NCHW images, got shape {tuple(images.shape)}")
    c = images.shape[1]
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    elif c == 4:
        images = images[:, :3]
    elif c != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {c} (shape {tuple(images.shape)})")
    return images


def _pil_bicubic_float(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    src = images.detach().cpu().numpy()
    out = np.empty((src.shape[0], src.shape[1], height, width), dtype=np.float32)
    for i in range(src.shape[0]):
        for c in range(src.shape[1]):
            # A 2-D float32 array becomes a mode "F" image: PIL then filters without rounding.
            channel = Image.fromarray(src[i, c].astype(np.float32))
            out[i, c] = np.asarray(channel.resize((width, height), resample=Image.BICUBIC))
    np.clip(out, 0.0, 255.0, out=out)
    return torch.from_numpy(out)


def _pil_bicubic_weights(in_size: int, out_size: int, device) -> torch.Tensor:
    """PIL's antialiased bicubic resampling as an ``[out, in]`` float64 matrix: Pillow's
    ``precompute_coeffs`` (Resample.c) with its bicubic filter (a = −0.5, support 2 scaled by
    the downscale factor), each row normalised to sum 1."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C's (int): truncation toward zero
        hi = min(int(center + support + 0.5), in_size)
        x = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / filterscale
        ax = x.abs()
        k = torch.where(ax < 1, (1.5 * ax - 2.5) * ax * ax + 1,
                        torch.where(ax < 2, ((ax - 5) * ax + 8) * ax * -0.5 + 2.0, 0.0))
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else k
    return w.to(device)


def _tensor_bicubic_float(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The "clean" resize on the images' own device (a GPU): Pillow's two passes —
    horizontal, stored as float32, then vertical — with float64 weights and sums, clipped to
    [0, 255]. Equal to :func:`_pil_bicubic_float` up to float32 rounding (tests: ≤ 1e-3)."""
    x = images.to(torch.float64)
    if x.shape[-1] != width:
        x = (x @ _pil_bicubic_weights(x.shape[-1], width, x.device).T).float().double()
    if x.shape[-2] != height:
        x = _pil_bicubic_weights(x.shape[-2], height, x.device) @ x
    return x.float().clamp_(0.0, 255.0)


def _tf1_source_index(in_size: int, out_size: int, device: torch.device):
    # TF1 resize_bilinear(align_corners=False): src = dst * (in / out), no half-pixel shift.
    scale = in_size / out_size
    src = torch.arange(out_size, device=device, dtype=torch.float32) * scale
    lo = src.floor().long().clamp_(max=in_size - 1)
    hi = (lo + 1).clamp_(max=in_size - 1)
    return lo, hi, src - lo.to(torch.float32)


def _tf1_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    y0, y1, wy = _tf1_source_index(x.shape[-2], height, x.device)
    x0, x1, wx = _tf1_source_index(x.shape[-1], width, x.device)
    rows0, rows1 = x[:, :, y0, :], x[:, :, y1, :]
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * wx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def resize_uint8(images: torch.Tensor, size: int | tuple, mode: str = "clean", *,
                 on_device: bool = False) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size`` with the ``mode`` convention.

    Returns float32 values in [0, 255] (not re-quantised). "clean" runs on the CPU (PIL, the
    reference) and returns a CPU tensor, or with ``on_device`` as tensor arithmetic on the
    input's device (the same filter; for a GPU, where PIL's 1–2.5 ms per image would be the
    bottleneck); "legacy" runs on the input's device. See the module docstring.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"resize_uint8 expects uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if mode == "clean":
        if on_device:
            return _tensor_bicubic_float(images, height, width)
        return _pil_bicubic_float(images, height, width)
    if mode == "legacy":
        return _tf1_bilinear(images.to(torch.float32), height, width)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def prepare_uint8(images: Any, size: int | tuple, resize_mode: str, device: torch.device,
                  mean: float, std: float) -> torch.Tensor:
    """The input of a uint8 detector: ``(resize_uint8(to_uint8_rgb(images)) - mean) / std``
    as float32 on ``device``.

    ``resize_mode="legacy"`` resizes on ``device``; any other mode resizes with "clean": on a
    CUDA ``device`` as tensor arithmetic there, elsewhere with PIL on the CPU (the reference),
    then moves the result to ``device``.
    """
    images = to_uint8_rgb(images)
    device = torch.device(device)
    if resize_mode == "legacy":
        x = resize_uint8(images.to(device), size, "legacy")
    elif device.type == "cuda":
        x = resize_uint8(images.to(device), size, "clean", on_device=True)
    else:
        x = resize_uint8(images, size, "clean").to(device)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------

def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not contain a state dict (got {type(state).__name__})")
    return state


def _resolve_weights(path: str | os.PathLike | None, env: str, what: str,
                     hint: str) -> Path:
    candidate = path if path is not None else os.environ.get(env)
    if not candidate:
        raise FileNotFoundError(
            f"{what}: no weights file given. Pass weights_path=... or set {env}. {hint}"
        )
    candidate = Path(candidate).expanduser()
    if not candidate.is_file():
        source = "weights_path" if path is not None else env
        raise FileNotFoundError(
            f"{what}: weights file {candidate} (from {source}) does not exist. Pass weights_path=... "
            f"or set {env}. {hint}"
        )
    return candidate


def _load_strict(module: nn.Module, state: dict, where: str) -> None:
    # Files written before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; it is unused
    # in eval mode, so only that key may be missing.
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{where}: state dict does not match the network "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''})"
        )


class FrozenModule(nn.Module):
    """Evaluation-only network: stays in eval mode (BatchNorm must use running stats).

    The base of every detector module; ``device`` is where its first parameter (or buffer)
    lives, the CPU for a module without either.
    """

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

_REGISTRY: dict = {}


def register_detector(name: str, factory: Callable[..., Detector], overwrite: bool = False) -> None:
    """Make ``get_detector(name, **kw)`` call ``factory(**kw)`` (e.g. the Fashion-MNIST net)."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"detector {name!r} is already registered (pass overwrite=True to replace)")
    _REGISTRY[name] = factory


def available_detectors() -> list:
    return sorted(_REGISTRY)


def get_detector(name: str, **kwargs) -> Detector:
    """Build a detector by name. ``"clip:<model>"`` is shorthand for ``get_detector("clip",
    model_name="<model>")``."""
    if name.startswith("clip:"):
        kwargs.setdefault("model_name", name[len("clip:"):])
        name = "clip"
    if name not in _REGISTRY:
        raise KeyError(f"unknown detector {name!r}; registered: {available_detectors()}")
    return _REGISTRY[name](**kwargs)


def _builtin(name: str) -> Callable[..., Detector]:
    """A factory for the detector class ``name`` that imports its module on first call."""

    def factory(**kwargs) -> Detector:
        return __getattr__(name)(**kwargs)

    factory.__name__ = factory.__qualname__ = name
    return factory


register_detector("inception", _builtin("InceptionV3FID"))
register_detector("inception-v3", _builtin("InceptionV3FID"))
register_detector("clip", _builtin("ClipDetector"))
register_detector("effnet-lite0", _builtin("EffNetLite0Detector"))


# ----------------------------------------------------------------------------------------
# Batched extraction
# ----------------------------------------------------------------------------------------

def _iter_images(source) -> Iterator[torch.Tensor]:
    """Yield uint8 [n, 3, H, W] chunks from a tensor, a dataset, or an iterable of images,
    batches or (image, label) pairs."""
    if torch.is_tensor(source) or isinstance(source, np.ndarray):
        yield to_uint8_rgb(source)
        return
    items = source
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (list, tuple)):
        items = (source[i] for i in range(len(source)))
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) > 0 and not isinstance(item[0], (int, float)):
            item = item[0]  # (image, label, ...) pairs from datasets / loaders
        if isinstance(item, dict):
            item = item.get("image", item.get("images"))
        yield to_uint8_rgb(item)


def _rebatch(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    pending, count, shape = [], 0, None
    for chunk in chunks:
        start = 0
        while start < chunk.shape[0]:
            if shape is not None and chunk.shape[1:] != shape and pending:
                # Sizes differ (e.g. a folder of mixed photos): flush, detectors resize anyway.
                yield torch.cat(pending)
                pending, count = [], 0
            shape = chunk.shape[1:]
            take = min(batch_size - count, chunk.shape[0] - start)
            pending.append(chunk[start:start + take])
            count += take
            start += take
            if count == batch_size:
                yield torch.cat(pending)
                pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def iter_feature_batches(detector: Detector, images, batch_size: int = 64, progress: bool = False,
                         max_count: int | None = None) -> Iterator[torch.Tensor]:
    """Yield float32 CPU feature batches ``[<=batch_size, D]`` without keeping them all."""
    total = None
    if max_count is not None:
        total = max_count
    elif torch.is_tensor(images):
        total = images.shape[0] if images.ndim == 4 else 1
    elif hasattr(images, "__len__"):
        total = len(images)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"features [{getattr(detector, 'name', 'detector')}]", unit="img")
    done = 0
    try:
        for batch in _rebatch(_iter_images(images), batch_size):
            if max_count is not None and done + batch.shape[0] > max_count:
                batch = batch[: max_count - done]
            if batch.shape[0] == 0:
                break
            feats = detector(batch)
            done += batch.shape[0]
            if bar is not None:
                bar.update(batch.shape[0])
            yield feats.detach().to("cpu", torch.float32)
            if max_count is not None and done >= max_count:
                break
    finally:
        if bar is not None:
            bar.close()


def extract_features(detector: Detector, images, batch_size: int = 64, progress: bool = True,
                     max_count: int | None = None) -> torch.Tensor:
    """All features of ``images`` as one float32 ``[N, D]`` CPU tensor (use FeatureStats in
    ``diffdistill.eval.fid`` when only the mean/covariance are needed)."""
    batches = list(iter_feature_batches(detector, images, batch_size, progress, max_count))
    if not batches:
        return torch.empty(0, int(detector.feature_dim))
    return torch.cat(batches)
