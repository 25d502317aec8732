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

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

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
