"""Training data for every trainer: the dataset classes and :func:`build_dataset`.

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

Neighbouring modules hold the rest, and their public names are re-exported here:
:mod:`diffdistill.items` (per-item randomness, the transform, :func:`collate`),
:mod:`diffdistill.shards` (:class:`WebDatasetShards`),
:mod:`diffdistill.fmnist` (the IDX format, Fashion-MNIST's class names, captions and image
tensors), :mod:`diffdistill.image_folder` (listing and decoding image files) and
:mod:`diffdistill.embedding_cache` (:class:`EmbeddingCache`, :func:`hash_key`).

Design notes (where this module departs from the obvious):

* Fashion-MNIST at resolutions other than 32 is resized once in float and rounded back to
  uint8, so the training tensors and the FID reference images
  (:func:`fashion_mnist_uint8`) are the very same pixels.
* A corrupt image never stops a run: ``__getitem__`` deterministically reads the next
  readable index instead and reports the item's real ``index``. Counters
  (``skipped``, ``empty_captions``) live in the process that reads; with DataLoader
  workers each worker has its own copy, but every bad path is still logged once per
  process through ``logging.getLogger("diffdistill.data")``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from diffdistill.embedding_cache import EmbeddingCache, hash_key
from diffdistill.fmnist import (
    CAPTION_TEMPLATES,
    FMNIST_CAPTION_WORDS,
    FMNIST_CLASSES,
    _fill_template,
    _fmnist_to_uint8_rgb,
    caption_for_class,
    fashion_mnist_uint8,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from diffdistill.image_folder import IMAGE_EXTENSIONS, list_images, load_image_rgb, read_metadata
from diffdistill.items import (
    SkipLog,
    _ImageTransform,
    _stable_int,
    _to_minus1_1,
    collate,
    image_item,
)
from diffdistill.shards import WebDatasetShards

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
# Image-file datasets and the SDXL-style resize / crop / flip
# --------------------------------------------------------------------------------------


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
            return image_item(self.transform(image, current, self.epoch), caption, label,
                              current)
        raise RuntimeError(f"none of the {n} images in {self.root} could be read "
                           "(the reasons are logged by 'diffdistill.data')")


def _images_or_empty(folder: Path) -> list[Path]:
    """:func:`list_images`, but ``[]`` for a folder without images: the datasets report an
    empty dataset themselves, and an empty class folder is not an error."""
    try:
        return list_images(folder)
    except FileNotFoundError:
        return []


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
            for path in _images_or_empty(self.root):
                sidecar = path.with_suffix(".txt")
                caption = (sidecar.read_text(encoding="utf-8", errors="replace").strip()
                           if sidecar.is_file() else "")
                self.samples.append((path, caption, -1))
        self._check_not_empty()

    def _from_metadata(self, metadata: Path) -> None:
        rows = read_metadata(metadata)
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
        self.unlisted = sum(1 for p in _images_or_empty(self.root) if p.resolve() not in listed)
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
            for path in _images_or_empty(self.root / name):
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
