"""Small image utilities shared by training (sample grids) and evaluation (report grids)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 NCHW (C = 1 or 3) → one HxWx3 uint8 array, row-major, with ``pad`` px borders."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("make_grid expects a uint8 NCHW tensor")
    imgs = images.cpu()
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    n, _, h, w = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = imgs[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: Optional[int] = None,
              scale: int = 1) -> Path:
    """Write a PNG grid atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid(images, nrow))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
