"""Image files on disk: finding them in a folder, reading its metadata, decoding to RGB.

:func:`list_images` is the one folder listing used by training data
(:mod:`diffdistill.data`) and evaluation (:mod:`diffdistill.eval.fid`);
:func:`read_metadata` reads a Hugging Face ``imagefolder`` ``metadata.jsonl`` / ``.csv``;
:func:`load_image_rgb` decodes any PIL mode the way a viewer would display it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image_rgb", "read_metadata"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder``, recursively, in sorted order.

    An image file is one whose name ends in one of :data:`IMAGE_EXTENSIONS`, in any case
    (``a.JPG`` counts). Hidden files and hidden folders below ``folder`` (names starting
    with ``.``: macOS ``._photo.jpg`` resource forks, ``.ipynb_checkpoints``, ``.cache``)
    are skipped, and symlinked folders are not followed. Raises :class:`FileNotFoundError` naming the folder
    and the extensions when there is no image (also when ``folder`` does not exist).
    """
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return sorted(found)


def read_metadata(path: Path) -> list[dict]:
    """The rows of a Hugging Face ``imagefolder`` metadata file: ``metadata.csv`` (a
    ``csv.DictReader``) or ``metadata.jsonl`` (one JSON object per line, blank lines
    skipped); a malformed line raises ``ValueError`` naming the file and line."""
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
