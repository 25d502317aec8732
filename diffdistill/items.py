"""What a training item is, shared by every dataset: deterministic per-item randomness
(:func:`_stable_int`), the skipped-input log, the resize / crop / flip transform with SDXL's
micro-conditioning, pixel scaling and :func:`collate`."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("diffdistill.data")


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


def image_item(transformed: dict, caption: str, label: int, index: int, **extra) -> dict:
    """One image dataset item (the module docstring of :mod:`diffdistill.data`) from the
    output of :class:`_ImageTransform` and the item's caption, class label and index."""
    return {"pixel_values": transformed["pixel_values"], "caption": caption,
            "class_label": label, "original_size": transformed["original_size"],
            "crop_top_left": transformed["crop_top_left"], "index": index, **extra}
