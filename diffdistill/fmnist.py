"""Fashion-MNIST: the IDX file format, class names and captions, and the image tensors.

* :func:`read_idx` / :func:`write_idx`: the MNIST IDX format, gzip-compressed or raw.
* :data:`FMNIST_CLASSES`, :data:`FMNIST_CAPTION_WORDS`, :data:`CAPTION_TEMPLATES` and
  :func:`caption_for_class`: what each label is called and how it is captioned.
* :func:`find_fashion_mnist` / :func:`load_fashion_mnist`: the IDX files from the Debian
  package ``dataset-fashion-mnist`` (or ``$DIFFDISTILL_FMNIST``), cached per process.
* :func:`fashion_mnist_uint8`: the uint8 RGB images (the FID reference images). At
  resolutions other than 32 they are resized once in float and rounded back to uint8, so
  they are the very same pixels as the training tensors of
  :class:`diffdistill.data.FashionMNISTDataset`.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CAPTION_TEMPLATES",
    "FMNIST_CAPTION_WORDS",
    "FMNIST_CLASSES",
    "caption_for_class",
    "fashion_mnist_uint8",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]

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
#: The validation images: the last 10,000 of the training split (955–1050 per class). Knobs
#: (conditioning timesteps, guidance, divergences, checkpoints) are chosen against them so the
#: test split stays unseen by every choice it reports. The teachers trained on all 60,000
#: training images; a reference for choosing need not be unseen by the teacher, only
#: distinct from the one that reports the result.
VAL_RANGE = (50000, 60000)


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
    """``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` "train", "test" or
    "val" (training images ``VAL_RANGE``, a subset of "train").

    Arrays are cached per process and read-only (copy before editing).
    """
    if split == "val":
        images, labels = load_fashion_mnist("train", root)
        lo, hi = VAL_RANGE
        return images[lo:hi], labels[lo:hi]
    if split not in _FMNIST_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be 'train', 'test' or 'val', got {split!r}")
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
