"""Training data for every trainer: image-caption datasets, Fashion-MNIST, prompts, caches.

Every map-style dataset returns a dict per item and :func:`collate` batches them:

========================  ==========================================================
``pixel_values``          float32 ``3×H×W`` in ``[-1, 1]``
``caption``               ``str`` (may be ``""``)
``class_label``           ``int`` (``-1`` when the data has no classes)
``original_size``         ``(H, W)`` of the source image before resizing (SDXL micro-
                          conditioning, Podell et al. 2023, sec. 2.2)
``crop_top_left``         ``(top, left)`` of the crop in the resized image (SDXL)
``index``                 ``int``: the dataset index the item was actually read from
========================  ==========================================================

Prompt-only data (:class:`PromptFile`, what DMD2's generator needs) returns only
``caption`` and ``index``.

Sources: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (the embedded
tiny world), Hugging Face ``imagefolder`` folders (``metadata.jsonl``) or ``.txt``
sidecars, class folders, prompt files and webdataset tar shards (read with :mod:`tarfile`,
so the optional ``webdataset`` package is not needed for local shards).

:class:`EmbeddingCache` stores tensors (VAE latents, prompt embeddings) keyed by strings in
append-only safetensors shards so that an expensive encoder runs once per input across runs.

Design notes (where this module departs from the obvious):

* Fashion-MNIST at resolutions other than 32 is resized once in float and rounded back to
  uint8, so the training tensors and the FID reference images
  (:func:`fashion_mnist_uint8`) are the very same pixels.
* A corrupt image never stops a run: ``__getitem__`` deterministically reads the next
  readable index instead and reports the item's real ``index``. Counters
  (``skipped``, ``empty_captions``) live in the process that reads; with DataLoader
  workers each worker has its own copy, but every bad path is still logged once per
  process through ``logging.getLogger("diffdistill.data")``.
* :class:`EmbeddingCache` never rewrites a shard: each ``flush`` writes one new file
  (temp file + ``os.replace``) with a unique name, so several processes can fill one cache
  directory at once without locks, and a crash cannot leave a half-written shard.
"""

from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import subprocess
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

logger = logging.getLogger("diffdistill.data")

__all__ = [
    "CAPTION_TEMPLATES",
    "FMNIST_CAPTION_WORDS",
    "FMNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ClassFolder",
    "EmbeddingCache",
    "FashionMNISTDataset",
    "ImageCaptionFolder",
    "PromptFile",
    "SkipLog",
    "WebDatasetShards",
    "build_dataset",
    "caption_for_class",
    "check_batch_size",
    "check_resolution",
    "collate",
    "fashion_mnist_uint8",
    "find_fashion_mnist",
    "hash_key",
    "load_fashion_mnist",
    "load_image_rgb",
    "read_idx",
    "write_idx",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# --------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------


def _stable_int(*parts: object) -> int:
    """A 64-bit integer from ``parts`` that is the same in every process and run.

    Python's ``hash`` is salted per process (PYTHONHASHSEED), so it cannot decide captions,
    crops or flips that must agree across ranks and resumes.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def hash_key(*parts: object) -> str:
    """sha1 hex digest of ``parts`` (e.g. a prompt, or image path + resolution + VAE id).

    Use it to build :class:`EmbeddingCache` keys that change whenever any input changes.
    """
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()


class SkipLog:
    """Counts unreadable inputs and logs each bad path once (per process).

    ``count`` is the number of times an input was skipped, ``paths`` maps each bad path to
    the reason. ``int(skip_log)`` gives ``count``; ``len(skip_log)`` the distinct paths.
    """

    def __init__(self) -> None:
        self.count = 0
        self.paths: dict[str, str] = {}

    def add(self, path: object, reason: object) -> None:
        self.count += 1
        key = str(path)
        if key not in self.paths:
            self.paths[key] = str(reason)
            logger.warning("skipping unreadable input %s: %s", key, reason)

    def __int__(self) -> int:
        return self.count

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: object) -> bool:
        return str(path) in self.paths

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count}, paths={len(self.paths)})"


def _to_minus1_1(image_uint8: torch.Tensor) -> torch.Tensor:
    return image_uint8.to(torch.float32) / 127.5 - 1.0


def collate(items: Sequence[dict]) -> dict:
    """Batch dataset items: tensors are stacked, ints and int tuples become LongTensors,
    strings (and anything else) stay Python lists."""
    if not items:
        raise ValueError("collate() got an empty list of items")
    keys = list(items[0].keys())
    for item in items[1:]:
        if set(item.keys()) != set(keys):
            raise ValueError(
                f"collate(): items have different keys: {sorted(keys)} vs {sorted(item.keys())}"
            )
    batch: dict = {}
    for key in keys:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, (bool, np.bool_)):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, (int, np.integer)):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(first, (tuple, list)) and all(
            isinstance(x, (int, np.integer)) for v in values for x in v
        ):
            batch[key] = torch.tensor([[int(x) for x in v] for v in values], dtype=torch.long)
        else:
            batch[key] = values
    return batch


# --------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
# --------------------------------------------------------------------------------------

# IDX type codes (third magic byte) -> big-endian numpy dtype, from the MNIST file spec.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw, into a numpy array."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'} "
            f"(expected 0000 + type byte in {sorted(hex(k) for k in _IDX_DTYPES)} + ndim)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), "
                         f"file has {len(data)} bytes")
    array = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``); the
    inverse of :func:`read_idx`, for the dtypes the format has (u1, i1, i2, i4, f4, f8)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX has no type for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# The names used by Zalando's Fashion-MNIST README, label order 0..9.
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# What a person would write in a caption for each label ("a photo of a t-shirt").
FMNIST_CAPTION_WORDS = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
)

FMNIST_ENV = "DIFFDISTILL_FMNIST"
FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_PREFIX = {"train": "train", "test": "t10k"}


def _fill_template(template: str, word: str) -> str:
    # Templates say "a {}"; "a ankle boot" would teach the text encoder bad English.
    return re.sub(r"\ba (?=[aeiouAEIOU])", "an ", template.format(word))


def caption_for_class(label: int, template_index: int = 0,
                      templates: Sequence[str] = CAPTION_TEMPLATES) -> str:
    """The caption of Fashion-MNIST class ``label`` with template ``template_index``."""
    if not 0 <= int(label) < len(FMNIST_CAPTION_WORDS):
        raise ValueError(f"Fashion-MNIST label must be in 0..9, got {label}")
    return _fill_template(templates[template_index % len(templates)],
                          FMNIST_CAPTION_WORDS[int(label)])


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding Fashion-MNIST's IDX files: ``root``, else ``$DIFFDISTILL_FMNIST``,
    else ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``)."""
    # An explicit choice that is wrong is an error, not a reason to fall back silently.
    if root is not None:
        where, folder = "root argument", Path(root)
    elif os.environ.get(FMNIST_ENV):
        where, folder = f"${FMNIST_ENV}", Path(os.environ[FMNIST_ENV])
    else:
        where, folder = "default location", FMNIST_DEFAULT_DIR
    if _idx_file(folder, "train-images-idx3-ubyte") or _idx_file(folder, "t10k-images-idx3-ubyte"):
        return folder
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in {where} {folder}). Install it with "
        f"'sudo apt-get install dataset-fashion-mnist' (files land in {FMNIST_DEFAULT_DIR}), "
        f"or set {FMNIST_ENV} to a folder holding "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    )


@lru_cache(maxsize=4)
def _load_fashion_mnist_cached(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _FMNIST_PREFIX[split]
    files = {}
    for kind in ("images-idx3", "labels-idx1"):
        path = _idx_file(Path(folder), f"{prefix}-{kind}-ubyte")
        if path is None:
            raise FileNotFoundError(f"{folder} has no {prefix}-{kind}-ubyte[.gz] "
                                    f"(Fashion-MNIST {split} split)")
        files[kind] = path
    images = read_idx(files["images-idx3"])
    labels = read_idx(files["labels-idx1"]).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"unexpected Fashion-MNIST arrays in {folder}: images "
                         f"{images.dtype}{images.shape}, labels {labels.shape}")
    # Shared between callers through the cache: make accidental in-place edits fail loudly.
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` "train" or "test".

    Arrays are cached per process and read-only (copy before editing).
    """
    if split not in _FMNIST_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _load_fashion_mnist_cached(str(find_fashion_mnist(root).resolve()), split)


def _fmnist_to_uint8_rgb(gray: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [N,28,28] -> uint8 [N,3,R,R]: pad 2 px of background, then resize if R != 32."""
    # np.array copies: the cached arrays are read-only and torch warns about sharing them.
    x = torch.from_numpy(np.array(gray, dtype=np.uint8)).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=0)  # 28 -> 32, background is 0 in Fashion-MNIST
    if resolution != 32:
        y = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


def fashion_mnist_uint8(split: str = "train", resolution: int = 32,
                        root: str | os.PathLike | None = None,
                        limit: int | None = None) -> torch.Tensor:
    """Fashion-MNIST as uint8 ``N×3×H×W`` (the FID reference images), same pixels as the
    training tensors of :class:`FashionMNISTDataset` at this resolution."""
    images, _ = load_fashion_mnist(split, root)
    if limit is not None:
        images = images[:limit]
    chunks = [_fmnist_to_uint8_rgb(images[i:i + 4096], resolution)
              for i in range(0, len(images), 4096)]
    if not chunks:
        return torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)
    return torch.cat(chunks)


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as captioned RGB images in ``[-1, 1]`` (the embedded tiny world).

    The caption template is a deterministic function of ``(seed, index)``, so an index has
    the same caption in every epoch, process and run (prompt-embedding caches stay valid).
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 resolution: int = 32, templates: Sequence[str] = CAPTION_TEMPLATES,
                 seed: int = 0, limit: int | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not templates:
            raise ValueError("templates must not be empty")
        self.split, self.resolution, self.seed = split, int(resolution), int(seed)
        self.templates = tuple(templates)
        self.images, self.labels = load_fashion_mnist(split, root)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.classes = FMNIST_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def template_index(self, index: int) -> int:
        return _stable_int("fmnist-caption", self.seed, index) % len(self.templates)

    def caption(self, index: int) -> str:
        return _fill_template(self.templates[self.template_index(index)],
                              FMNIST_CAPTION_WORDS[int(self.labels[index])])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        image = _fmnist_to_uint8_rgb(self.images[index:index + 1], self.resolution)[0]
        return {
            "pixel_values": _to_minus1_1(image),
            "caption": self.caption(index),
            "class_label": int(self.labels[index]),
            # The padded/resized image is what the model sees and what sampling asks for.
            "original_size": (self.resolution, self.resolution),
            "crop_top_left": (0, 0),
            "index": index,
        }


# --------------------------------------------------------------------------------------
# Image decoding and the SDXL-style resize / crop / flip
# --------------------------------------------------------------------------------------


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would display it."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        # Transparent pixels have arbitrary colour underneath; white is what viewers show.
        return _composite_on_white(image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's convert("L") clips 16-bit values at 255 (a white image), so scale instead.
        # 'I' almost always holds 16-bit PNG/TIFF data, hence the 0..65535 range.
        array = np.asarray(image).astype(np.float64)
        if mode == "F" and array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        elif mode != "F":
            array = array / 257.0  # 65535 / 257 = 255 exactly
        gray = np.clip(np.rint(np.nan_to_num(array)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    # CMYK, L, 1, P, YCbCr, LAB, HSV: PIL's own conversions are right for these.
    return image.convert("RGB")


def load_image_rgb(source: str | os.PathLike | bytes | io.BytesIO) -> Image.Image:
    """Open an image file (or bytes), apply its EXIF orientation, return 8-bit RGB.

    Raises on unreadable data; the datasets catch that and skip the file.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        image.load()  # decode now so truncated files fail here, not later
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)


class _ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square, maybe flip (SDXL recipe).

    ``crop_top_left`` is in the resized image's coordinates and, after a flip, is measured
    in the flipped image (as SDXL's ``add_time_ids`` expect). Random decisions come from
    ``(seed, key, epoch)`` so they replay identically on resume and across ranks.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, resample: int = Image.Resampling.BICUBIC):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.center_crop, self.random_flip = int(resolution), center_crop, random_flip
        self.seed, self.resample = int(seed), resample

    def __call__(self, image: Image.Image, key: object, epoch: int) -> dict:
        width, height = image.size
        res = self.resolution
        scale = res / min(width, height)
        new_w = max(res, round(width * scale))
        new_h = max(res, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample)
        rng = random.Random(_stable_int("crop-flip", self.seed, key, epoch))
        if self.center_crop:
            top, left = round((new_h - res) / 2.0), round((new_w - res) / 2.0)
        else:
            top, left = rng.randint(0, new_h - res), rng.randint(0, new_w - res)
        image = image.crop((left, top, left + res, top + res))
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = new_w - left - res
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return {
            "pixel_values": _to_minus1_1(pixels),
            "original_size": (height, width),
            "crop_top_left": (top, left),
            "flipped": flip,
        }


class _ImageFileDataset(Dataset):
    """Shared machinery: a list of (path, caption, class_label), robust loading, epochs."""

    def __init__(self, root: str | os.PathLike, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a folder")
        self.transform = _ImageTransform(resolution, center_crop, random_flip, seed)
        self.resolution, self.seed, self.epoch = int(resolution), int(seed), 0
        self.skipped = SkipLog()
        self.samples: list[tuple[Path, str, int]] = []
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Random crops and flips depend on the epoch; call this at the start of each."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _check_not_empty(self) -> None:
        if not self.samples:
            raise ValueError(f"no images found in {self.root} "
                             f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.empty_captions = sum(1 for _, caption, _ in self.samples if not caption)
        if self.empty_captions:
            logger.info("%s: %d of %d images have an empty caption", self.root,
                        self.empty_captions, len(self.samples))

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        # Walk forward to the next readable file; the walk is the same on every rank/run.
        for step in range(n):
            current = (index + step) % n
            path, caption, label = self.samples[current]
            if current in self._bad:  # known bad: count the skip without decoding again
                self.skipped.add(path, "unreadable")
                continue
            try:
                image = load_image_rgb(path)
            except Exception as error:  # noqa: BLE001 - PIL raises many kinds of errors
                self._bad.add(current)
                self.skipped.add(path, f"{type(error).__name__}: {error}")
                continue
            item = self.transform(image, current, self.epoch)
            item.pop("flipped")
            return {
                "pixel_values": item["pixel_values"],
                "caption": caption,
                "class_label": label,
                "original_size": item["original_size"],
                "crop_top_left": item["crop_top_left"],
                "index": current,
            }
        raise RuntimeError(f"none of the {n} images in {self.root} could be read "
                           "(the reasons are logged by 'diffdistill.data')")


def _list_images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _read_metadata(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
                    f"{path}:{line_number}: expected a JSON object per line")
            rows.append(row)
    return rows


class ImageCaptionFolder(_ImageFileDataset):
    """Images with captions from a folder.

    Captions come from, in order of preference:

    (a) ``metadata.jsonl`` (or ``metadata.csv``) in ``root``, the Hugging Face
        ``imagefolder`` convention: a ``file_name`` column relative to ``root`` and a
        caption column ``caption_key`` (with the default ``"text"``, a ``"caption"``
        column is used when there is no ``"text"`` column). A caption that is a list
        (several captions per image) yields one of them, chosen by ``(seed, index)``.
        Images not listed in the metadata are ignored (counted in ``self.unlisted``);
        listed files that do not exist are counted in ``self.skipped``.
    (b) otherwise ``.txt`` sidecars next to each image (``a/cat.png`` + ``a/cat.txt``).

    Images without a caption get ``""``; ``self.empty_captions`` counts them.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, caption_key: str = "text", seed: int = 0):
        super().__init__(root, resolution, center_crop, random_flip, seed)
        self.caption_key = caption_key
        self.unlisted = 0
        metadata = next((self.root / name for name in ("metadata.jsonl", "metadata.csv")
                         if (self.root / name).is_file()), None)
        if metadata is not None:
            self._from_metadata(metadata)
        else:
            for path in _list_images(self.root):
                sidecar = path.with_suffix(".txt")
                caption = (sidecar.read_text(encoding="utf-8", errors="replace").strip()
                           if sidecar.is_file() else "")
                self.samples.append((path, caption, -1))
        self._check_not_empty()

    def _from_metadata(self, metadata: Path) -> None:
        rows = _read_metadata(metadata)
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
        if rows and "file_name" not in columns:
            raise ValueError(f"{metadata} has no 'file_name' column (columns: {sorted(columns)})")
        if self.caption_key in columns:
            key = self.caption_key
        elif self.caption_key == "text" and "caption" in columns:
            key = "caption"
        elif self.caption_key == "text":
            key = None  # unconditional data is legal in imagefolder; captions are all ""
            logger.warning("%s has no 'text' or 'caption' column; all captions are empty",
                           metadata)
        else:
            raise ValueError(f"{metadata} has no caption column {self.caption_key!r} "
                             f"(columns: {sorted(columns)})")
        listed = set()
        for row in rows:
            path = (metadata.parent / str(row["file_name"])).resolve()
            listed.add(path)
            if not path.is_file():
                self.skipped.add(path, "listed in metadata but missing")
                continue
            caption = row.get(key) if key else ""
            if isinstance(caption, list):
                caption = (caption[_stable_int("multi-caption", self.seed, len(self.samples))
                                   % len(caption)] if caption else "")
            caption = "" if caption is None else str(caption).strip()
            self.samples.append((path, caption, -1))
        self.unlisted = sum(1 for p in _list_images(self.root) if p.resolve() not in listed)
        if self.unlisted:
            logger.warning("%s: %d images are not listed in %s and are ignored",
                           self.root, self.unlisted, metadata.name)


class ClassFolder(_ImageFileDataset):
    """Class-labelled images: ``root/<class name>/**/*.png``. Labels follow the sorted
    class names; the caption is the class name (underscores read as spaces) put into the
    first template, e.g. ``"a photo of a golden retriever"``."""

    def __init__(self, root: str | os.PathLike, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0,
                 templates: Sequence[str] = CAPTION_TEMPLATES):
        super().__init__(root, resolution, center_crop, random_flip, seed)
        self.classes = sorted(d.name for d in self.root.iterdir()
                              if d.is_dir() and not d.name.startswith("."))
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        for name in self.classes:
            caption = _fill_template(templates[0], name.replace("_", " "))
            for path in _list_images(self.root / name):
                self.samples.append((path, caption, self.class_to_idx[name]))
        self._check_not_empty()


# --------------------------------------------------------------------------------------
# Prompts only
# --------------------------------------------------------------------------------------


class PromptFile(Dataset):
    """One prompt per line (blank lines skipped). Items: ``{"caption", "index"}``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"prompt file {self.path} does not exist")
        text = self.path.read_text(encoding="utf-8")
        self.prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not self.prompts:
            raise ValueError(f"prompt file {self.path} has no prompts (only blank lines)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} prompts")
        index %= len(self)
        return {"caption": self.prompts[index], "index": index}


# --------------------------------------------------------------------------------------
# Webdataset shards, read with tarfile
# --------------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style ranges: ``shard-{000..009}.tar`` -> 10 names."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    start, end = match.group(1), match.group(2)
    width = len(start) if start.startswith("0") else 0
    names = []
    for i in range(int(start), int(end) + 1):
        names.extend(_expand_braces(pattern[:match.start()] + str(i).zfill(width)
                                    + pattern[match.end():]))
    return names


def _split_key(member_name: str) -> tuple[str, str]:
    # webdataset's convention: the key is the path up to the first dot of the basename,
    # the field is everything after it ("a/b/0001.seg.png" -> "a/b/0001", "seg.png").
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


def _distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class WebDatasetShards(IterableDataset):
    """Iterate over webdataset tar shards (``0001.jpg`` + ``0001.txt`` ...) with :mod:`tarfile`.

    ``urls_or_paths``: a list, a brace pattern (``data/shard-{0000..0099}.tar``), a folder
    (all ``*.tar`` in it), or http(s)/file URLs and ``pipe:command`` streams. Samples are
    split so that no two (process, DataLoader worker) pairs see the same sample: by shard
    when there are at least as many shards as readers, else by sample position within each
    shard (every reader then scans every shard but keeps only its own samples).

    Items are the usual dict plus ``key`` (``"<shard>/<sample key>"``); ``index`` is the
    sample's position within its shard, since a stream has no global index.
    Corrupt samples and unreadable shards are skipped and counted in ``self.skipped``.
    """

    def __init__(self, urls_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
                 resolution: int,
                 caption_keys: Sequence[str] = ("txt", "caption", "json:caption"),
                 image_keys: Sequence[str] = ("jpg", "png", "webp", "jpeg"),
                 center_crop: bool = True, random_flip: bool = False, seed: int = 0,
                 shuffle_shards: bool = False, process_index: int | None = None,
                 num_processes: int | None = None):
        self.shards = self._resolve(urls_or_paths)
        if not self.shards:
            raise ValueError(f"no webdataset shards found for {urls_or_paths!r}")
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.transform = _ImageTransform(resolution, center_crop, random_flip, seed)
        self.seed, self.epoch, self.shuffle_shards = int(seed), 0, shuffle_shards
        self.process_index, self.num_processes = process_index, num_processes
        self.skipped = SkipLog()
        self.empty_captions = 0

    @staticmethod
    def _resolve(spec) -> list[str]:
        if isinstance(spec, (str, os.PathLike)):
            spec = [spec]
        shards: list[str] = []
        for entry in spec:
            entry = os.fspath(entry)
            if os.path.isdir(entry):
                shards.extend(sorted(str(p) for p in Path(entry).glob("*.tar")))
            else:
                shards.extend(_expand_braces(entry))
        return shards

    def set_epoch(self, epoch: int) -> None:
        """Shard order (with ``shuffle_shards``) and random flips/crops depend on the epoch."""
        self.epoch = int(epoch)

    def _reader_slot(self) -> tuple[int, int]:
        rank, world = _distributed_rank_world()
        rank = rank if self.process_index is None else int(self.process_index)
        world = world if self.num_processes is None else int(self.num_processes)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _open(self, shard: str):
        if shard.startswith("pipe:"):
            process = subprocess.Popen(shard[5:], shell=True, stdout=subprocess.PIPE)
            return tarfile.open(fileobj=process.stdout, mode="r|*"), process
        if re.match(r"^(https?|file)://", shard):
            return tarfile.open(fileobj=urllib.request.urlopen(shard), mode="r|*"), None
        return tarfile.open(shard, mode="r|*"), None

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Group consecutive tar members by key (tar streams keep a sample's files together)."""
        process = None
        key, fields = None, {}
        try:
            archive, process = self._open(shard)
            with archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, field = _split_key(member.name)
                    if key is not None and member_key != key:
                        yield key, fields
                        fields = {}
                    key = member_key
                    extracted = archive.extractfile(member)
                    fields[field] = extracted.read() if extracted is not None else b""
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            self.skipped.add(shard, f"unreadable shard ({type(error).__name__}: {error})")
            # A truncated shard: the partial last sample is dropped rather than guessed.
            return
        finally:
            if process is not None:
                # Closing the pipe first stops a writer that is blocked on a full pipe when
                # the reader stops early; waiting then reaps it.
                process.stdout.close()
                process.wait()
        if key is not None:
            yield key, fields

    def _caption(self, fields: dict[str, bytes]) -> str:
        for name in self.caption_keys:
            if name.startswith("json:"):
                blob = fields.get("json")
                if blob is None:
                    continue
                value = json.loads(blob.decode("utf-8")).get(name[5:])
                if value is not None:
                    return str(value).strip()
            elif name in fields:
                return fields[name].decode("utf-8", errors="replace").strip()
        return ""

    def _decode(self, shard: str, key: str, position: int, fields: dict[str, bytes]) -> dict:
        image_field = next((k for k in self.image_keys if k in fields), None)
        if image_field is None:
            raise ValueError(f"no image field among {self.image_keys} (has {sorted(fields)})")
        image = load_image_rgb(fields[image_field])
        caption = self._caption(fields)
        label = int(fields["cls"].decode().strip()) if "cls" in fields else -1
        sample_id = f"{shard}/{key}"
        item = self.transform(image, sample_id, self.epoch)
        return {
            "pixel_values": item["pixel_values"],
            "caption": caption,
            "class_label": label,
            "original_size": item["original_size"],
            "crop_top_left": item["crop_top_left"],
            "index": position,
            "key": sample_id,
        }

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._reader_slot()
        shards = list(self.shards)
        if self.shuffle_shards:
            # Same permutation on every reader (seed, epoch), so the split stays disjoint.
            random.Random(_stable_int("shards", self.seed, self.epoch)).shuffle(shards)
        by_shard = len(shards) >= slots
        if by_shard:
            shards = shards[slot::slots]
        elif slots > 1:
            logger.info("%d shards for %d readers: splitting by sample inside each shard",
                        len(shards), slots)
        for shard in shards:
            for position, (key, fields) in enumerate(self._samples(shard)):
                if not by_shard and position % slots != slot:
                    continue
                try:
                    item = self._decode(shard, key, position, fields)
                except Exception as error:  # noqa: BLE001 - corrupt sample: skip, never stop
                    self.skipped.add(f"{shard}/{key}", f"{type(error).__name__}: {error}")
                    continue
                if not item["caption"]:
                    self.empty_captions += 1
                yield item


# --------------------------------------------------------------------------------------
# Factory and checks
# --------------------------------------------------------------------------------------

_DATASET_KINDS: dict[str, Callable[..., Dataset]] = {
    "fashion_mnist": FashionMNISTDataset,
    "imagefolder": ImageCaptionFolder,
    "classfolder": ClassFolder,
    "prompts": PromptFile,
    "webdataset": WebDatasetShards,
}


def build_dataset(kind: str, **kwargs) -> Dataset:
    """Build a dataset by name: one of ``fashion_mnist, imagefolder, classfolder, prompts,
    webdataset``; ``kwargs`` go to that class."""
    if kind not in _DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; allowed kinds: "
                         f"{', '.join(_DATASET_KINDS)}")
    return _DATASET_KINDS[kind](**kwargs)


def check_resolution(resolution: int, vae_factor: int) -> None:
    """Latent models need ``resolution`` to be a multiple of the VAE downsampling factor."""
    if resolution <= 0 or vae_factor <= 0:
        raise ValueError(f"resolution ({resolution}) and VAE factor ({vae_factor}) "
                         "must be positive")
    if resolution % vae_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE downsampling "
                         f"factor {vae_factor}")


def check_batch_size(dataset_len: int, batch_size: int, num_processes: int = 1) -> None:
    """Fail early when the dataset cannot fill one global batch (with ``drop_last`` every
    epoch would be empty and training would spin without a step)."""
    if batch_size <= 0 or num_processes <= 0:
        raise ValueError(f"batch_size ({batch_size}) and num_processes ({num_processes}) "
                         "must be positive")
    global_batch = batch_size * num_processes
    if dataset_len < global_batch:
        raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch "
                         f"of {global_batch} (batch_size {batch_size} × {num_processes} "
                         "processes); lower batch_size or add data")


# --------------------------------------------------------------------------------------
# Embedding / latent cache
# --------------------------------------------------------------------------------------


class EmbeddingCache:
    """Tensors keyed by strings, persisted in ``cache_dir/namespace/*.safetensors``.

    ``put`` buffers in memory; ``flush`` writes the buffer as one new shard (also done
    automatically every ``shard_size`` entries). A new instance over the same folder sees
    every flushed entry. Shards are loaded whole, lazily, and the last ``max_loaded_shards``
    are kept in memory. Choose keys that change with every input that matters, e.g.
    ``hash_key(image_path, resolution, vae_id)`` (see :func:`hash_key`).
    """

    def __init__(self, cache_dir: str | os.PathLike, namespace: str, shard_size: int = 1024,
                 max_loaded_shards: int = 8):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", namespace or ""):
            raise ValueError(f"namespace {namespace!r} must be a plain folder name "
                             "(letters, digits, '.', '_', '-')")
        self.directory = Path(cache_dir) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        self.namespace, self.shard_size, self.max_loaded_shards = namespace, shard_size, max_loaded_shards
        self._pending: dict[str, torch.Tensor] = {}
        self._index: dict[str, Path] = {}
        self._loaded: collections.OrderedDict[Path, dict[str, torch.Tensor]] = (
            collections.OrderedDict())
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the folder (picks up shards written by other processes)."""
        from safetensors import safe_open

        self._index.clear()
        # Names start with a timestamp, so sorted order is write order: later shards win.
        for shard in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        self._index[key] = shard
            except Exception as error:  # noqa: BLE001 - a foreign file: ignore, do not crash
                logger.warning("ignoring unreadable cache shard %s: %s", shard, error)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._index

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def keys(self) -> set[str]:
        return set(self._index) | set(self._pending)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._pending:
            return self._pending[key]
        shard = self._index.get(key)
        if shard is None:
            return None
        if shard not in self._loaded:
            from safetensors.torch import load_file

            self._loaded[shard] = load_file(str(shard))
            while len(self._loaded) > self.max_loaded_shards:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(shard)
        return self._loaded[shard][key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        # clone(): a slice of a batch shares storage with it, which safetensors refuses
        # to save, and would keep the whole batch alive.
        self._pending[str(key)] = tensor.detach().to("cpu").contiguous().clone()
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write buffered entries as one new shard, atomically. Returns its path."""
        if not self._pending:
            return None
        from safetensors.torch import save_file

        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        save_file(self._pending, str(temporary), metadata={"namespace": self.namespace})
        os.replace(temporary, final)
        self._loaded[final] = self._pending
        for key in self._pending:
            self._index[key] = final
        self._pending = {}
        while len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return final

    def cached_map(self, keys: Sequence[str],
                   compute_fn: Callable[[list], torch.Tensor | Sequence[torch.Tensor]],
                   batch_size: int = 64, inputs: Sequence | None = None) -> list[torch.Tensor]:
        """Tensors for ``keys``, computing only the missing ones, ``batch_size`` at a time.

        ``compute_fn`` receives a list of the missing keys' ``inputs`` (or of the keys
        themselves when ``inputs`` is None) and returns a batched tensor or a list of
        tensors, one per element. New entries are flushed before returning.
        """
        keys = [str(k) for k in keys]
        if inputs is not None and len(inputs) != len(keys):
            raise ValueError(f"cached_map: {len(keys)} keys but {len(inputs)} inputs")
        missing: dict[str, object] = {}
        for i, key in enumerate(keys):
            if key not in self and key not in missing:
                missing[key] = key if inputs is None else inputs[i]
        todo = list(missing.items())
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            outputs = compute_fn([value for _, value in chunk])
            if len(outputs) != len(chunk):
                raise ValueError(f"compute_fn returned {len(outputs)} results for "
                                 f"{len(chunk)} inputs")
            for (key, _), output in zip(chunk, outputs):
                self.put(key, output)
        self.flush()
        return [self.get(key) for key in keys]

