"""Tests for diffdistill.data: IDX/Fashion-MNIST, image folders, prompts, shards, caches."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill import data
from diffdistill.data import (
    ClassFolder,
    FashionMNISTDataset,
    ImageCaptionFolder,
    PromptFile,
    WebDatasetShards,
    build_dataset,
    check_batch_size,
    check_resolution,
    collate,
)
from diffdistill.embedding_cache import EmbeddingCache, hash_key
from diffdistill.fmnist import (
    CAPTION_TEMPLATES,
    FMNIST_CAPTION_WORDS,
    _fill_template,
    caption_for_class,
    fashion_mnist_uint8,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from diffdistill.image_folder import IMAGE_EXTENSIONS, list_images


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """Back from [-1, 1] to exact 0..255 integers (the datasets map v -> v/127.5 - 1)."""
    return ((pixel_values + 1.0) * 127.5).round().to(torch.int64)


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(color, size=(8, 8), mode="RGB"):
    return Image.new(mode, size, color)


# --------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_raw_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = tmp_path / "images-idx3-ubyte"
    raw.write_bytes(idx_bytes(images, 0x08))
    gz = tmp_path / "images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    for path in (raw, gz):
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, images)
    # Multi-byte types are big-endian on disk and native after reading.
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(idx_bytes(ints, 0x0C))
    out = read_idx(tmp_path / "ints")
    assert out.tolist() == [1, -2, 70000] and out.dtype == np.int32


def test_write_idx_round_trips_and_matches_the_spec_bytes(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    for name, array, code in (("a", images, 0x08), ("b.gz", ints, 0x0C)):
        path = write_idx(tmp_path / name, array)
        raw = path.read_bytes()
        assert (gzip.decompress(raw) if name.endswith(".gz") else raw) == idx_bytes(array, code)
        out = read_idx(path)
        assert out.dtype == array.dtype and np.array_equal(out, array)
    with pytest.raises(ValueError, match="no type for dtype int64"):
        write_idx(tmp_path / "c", np.zeros(2, np.int64))


def test_read_idx_rejects_wrong_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04" + bytes(16))
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((4, 4), np.uint8), 0x08)[:-3])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(short)


# --------------------------------------------------------------------------------------
# Fashion-MNIST (the real files from dataset-fashion-mnist)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist():
    """Loads each split once for the whole module (load_fashion_mnist also caches)."""
    return {"train": load_fashion_mnist("train"), "test": load_fashion_mnist("test")}


def test_fashion_mnist_sizes_and_labels(fmnist):
    train_images, train_labels = fmnist["train"]
    test_images, test_labels = fmnist["test"]
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28)
    assert train_labels.dtype == np.int64 and train_labels.min() == 0 and train_labels.max() == 9
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # Real images, not zeros: mean intensity of Fashion-MNIST train is about 72.9 / 255.
    assert 70 < train_images[:2000].mean() < 76
    assert load_fashion_mnist("train")[0] is train_images  # cached, not re-read


def test_fashion_mnist_dataset_pixels_padding_and_captions(fmnist):
    images, labels = fmnist["train"]
    dataset = FashionMNISTDataset("train", seed=0)
    assert len(dataset) == 60000
    for index in (0, 1, 59999):
        item = dataset[index]
        x = item["pixel_values"]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert x.min() >= -1.0 and x.max() <= 1.0
        # 2 px of background padding on every side is exactly -1.
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(x[:, border] == -1.0)
        # Interior is the original image, replicated to RGB.
        expected = torch.from_numpy(images[index].astype(np.float32)) / 127.5 - 1.0
        for channel in range(3):
            torch.testing.assert_close(x[channel, 2:30, 2:30], expected, rtol=0, atol=1e-6)
        assert item["class_label"] == int(labels[index])
        assert FMNIST_CAPTION_WORDS[item["class_label"]] in item["caption"]
        assert item["index"] == index
        assert item["original_size"] == (32, 32) and item["crop_top_left"] == (0, 0)

    again = FashionMNISTDataset("train", seed=0, limit=200)
    other_seed = FashionMNISTDataset("train", seed=1, limit=200)
    captions = [dataset[i]["caption"] for i in range(200)]
    assert captions == [again[i]["caption"] for i in range(200)]
    assert captions != [other_seed[i]["caption"] for i in range(200)]
    # Every template is used, each caption is a template filled with the class word.
    used = {dataset.template_index(i) for i in range(200)}
    assert used == set(range(len(CAPTION_TEMPLATES)))
    for i in range(200):
        word = FMNIST_CAPTION_WORDS[int(labels[i])]
        assert captions[i] == _fill_template(
            CAPTION_TEMPLATES[dataset.template_index(i)], word)


def test_caption_words_and_articles():
    assert caption_for_class(7) == "a photo of a sneaker"
    assert caption_for_class(9) == "a photo of an ankle boot"
    assert caption_for_class(9, template_index=1) == "an ankle boot"
    assert caption_for_class(0, template_index=3) == "a black and white photo of a t-shirt"
    with pytest.raises(ValueError):
        caption_for_class(10)


def test_fashion_mnist_uint8_matches_dataset_and_resizes(fmnist):
    images, _ = fmnist["test"]
    ref = fashion_mnist_uint8("test", resolution=32, limit=8)
    assert ref.dtype == torch.uint8 and ref.shape == (8, 3, 32, 32)
    assert torch.equal(ref[:, 0, 2:30, 2:30], torch.from_numpy(images[:8].copy()))
    assert torch.equal(ref[:, 0], ref[:, 2])
    dataset16 = FashionMNISTDataset("test", resolution=16, limit=8)
    ref16 = fashion_mnist_uint8("test", resolution=16, limit=8)
    assert ref16.shape == (8, 3, 16, 16)
    for i in range(8):
        # Training pixels and FID reference pixels are identical at every resolution.
        assert torch.equal(to_uint8(dataset16[i]["pixel_values"]), ref16[i].long())
    # Antialiased bilinear is PIL's triangle-filter resize of the padded image.
    for i in range(8):
        padded = Image.fromarray(np.pad(images[i], 2))
        pil = np.array(padded.resize((16, 16), Image.Resampling.BILINEAR)).astype(np.int64)
        assert np.abs(pil - ref16[i, 0].numpy().astype(np.int64)).max() <= 1


def test_find_fashion_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFDISTILL_FMNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist()
    with pytest.raises(FileNotFoundError, match="DIFFDISTILL_FMNIST"):
        find_fashion_mnist(tmp_path / "nowhere")
    monkeypatch.delenv("DIFFDISTILL_FMNIST")
    assert (find_fashion_mnist() / "train-images-idx3-ubyte.gz").is_file()
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_fashion_mnist_via_env_folder_of_raw_files(tmp_path, monkeypatch):
    images = np.full((3, 28, 28), 200, np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.array([9, 0, 3], np.uint8), 0x08))
    monkeypatch.setenv("DIFFDISTILL_FMNIST", str(tmp_path))
    dataset = FashionMNISTDataset("test")
    assert len(dataset) == 3 and dataset[0]["class_label"] == 9
    assert "ankle boot" in dataset[0]["caption"]
    assert torch.all(to_uint8(dataset[1]["pixel_values"])[:, 2:30, 2:30] == 200)


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def test_imagefolder_metadata_jsonl(tmp_path):
    colors = {"red.png": (255, 0, 0), "sub/green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
    for name, color in colors.items():
        save(solid(color), tmp_path / name)
    save(solid((9, 9, 9)), tmp_path / "unlisted.png")
    rows = [
        {"file_name": "red.png", "text": "a red square"},
        {"file_name": "sub/green.png", "text": ""},
        {"file_name": "blue.png", "text": "a blue square", "other": 1},
        {"file_name": "missing.png", "text": "gone"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = ImageCaptionFolder(tmp_path, resolution=4)
    assert len(dataset) == 3
    assert dataset.empty_captions == 1 and dataset.unlisted == 1
    assert dataset.skipped.count == 1 and str((tmp_path / "missing.png").resolve()) in dataset.skipped
    item = dataset[0]
    assert item["caption"] == "a red square" and item["class_label"] == -1
    assert item["pixel_values"].shape == (3, 4, 4)
    assert to_uint8(item["pixel_values"])[:, 0, 0].tolist() == [255, 0, 0]
    assert dataset[1]["caption"] == ""
    assert to_uint8(dataset[1]["pixel_values"])[:, 2, 2].tolist() == [0, 255, 0]
    assert to_uint8(dataset[2]["pixel_values"])[:, 3, 3].tolist() == [0, 0, 255]
    assert item["original_size"] == (8, 8) and item["crop_top_left"] == (0, 0)


def test_imagefolder_caption_column_fallback_and_explicit_key(tmp_path):
    save(solid((1, 2, 3)), tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "caption": "from caption", "prompt": "from prompt"}))
    assert ImageCaptionFolder(tmp_path, 8)[0]["caption"] == "from caption"
    assert ImageCaptionFolder(tmp_path, 8, caption_key="prompt")[0]["caption"] == "from prompt"
    with pytest.raises(ValueError, match="no caption column 'title'"):
        ImageCaptionFolder(tmp_path, 8, caption_key="title")


def test_imagefolder_txt_sidecars(tmp_path):
    save(solid((10, 20, 30)), tmp_path / "b" / "cat.png")
    (tmp_path / "b" / "cat.txt").write_text("  a cat on a mat \n")
    save(solid((40, 50, 60)), tmp_path / "dog.jpg", quality=100)
    dataset = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(dataset) == 2 and dataset.empty_captions == 1
    by_caption = {dataset[i]["caption"]: dataset[i] for i in range(2)}
    assert set(by_caption) == {"a cat on a mat", ""}
    assert to_uint8(by_caption["a cat on a mat"]["pixel_values"])[:, 4, 4].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    "make, expected",
    [
        # CMYK: magenta ink only -> (255, 0, 255); stored as TIFF, which keeps CMYK.
        (lambda: (solid((0, 255, 0, 0), mode="CMYK"), "tif"), (255, 0, 255)),
        # Fully transparent red shows the white background; half-transparent black is gray.
        (lambda: (solid((255, 0, 0, 0), mode="RGBA"), "png"), (255, 255, 255)),
        (lambda: (solid((0, 0, 0, 128), mode="RGBA"), "png"), (127, 127, 127)),
        (lambda: (solid((0, 0, 255, 255), mode="RGBA"), "png"), (0, 0, 255)),
        (lambda: (solid((0, 0), mode="LA"), "png"), (255, 255, 255)),
        # 16-bit gray: 128 * 257 = 32896 -> 128, not clipped to 255.
        (lambda: (Image.fromarray(np.full((8, 8), 32896, np.uint16)), "png"), (128, 128, 128)),
        (lambda: (Image.fromarray(np.full((8, 8), 65535, np.uint16)), "png"), (255, 255, 255)),
        (lambda: (Image.fromarray(np.full((8, 8), 32896, np.int32), mode="I"), "tif"),
         (128, 128, 128)),
        (lambda: (solid(77, mode="L"), "png"), (77, 77, 77)),
    ],
)
def test_mode_conversion(tmp_path, make, expected):
    image, ext = make()
    path = save(image, tmp_path / f"img.{ext}")
    with Image.open(path) as reopened:  # the file really keeps the unusual mode
        assert reopened.mode == image.mode or (image.mode, reopened.mode) == ("I", "I;16")
    dataset = ImageCaptionFolder(tmp_path, resolution=8)
    got = to_uint8(dataset[0]["pixel_values"])[:, 3, 3].tolist()
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), (got, expected)


def test_palette_images_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    save(palette_image, tmp_path / "opaque" / "p.png")
    got = to_uint8(ImageCaptionFolder(tmp_path / "opaque", 8)[0]["pixel_values"])
    assert got[:, 4, 4].tolist() == [200, 100, 50] and got[:, 0, 0].tolist() == [0, 0, 0]
    # Palette entry 0 declared transparent: that pixel is composited on white.
    save(palette_image, tmp_path / "transparent" / "p.png", transparency=0)
    got = to_uint8(ImageCaptionFolder(tmp_path / "transparent", 8)[0]["pixel_values"])
    assert got[:, 0, 0].tolist() == [255, 255, 255] and got[:, 4, 4].tolist() == [200, 100, 50]


def test_corrupt_file_is_skipped_counted_and_logged(tmp_path, caplog):
    save(solid((255, 0, 0)), tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(np.random.default_rng(0).bytes(500))
    save(solid((0, 0, 255)), tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # truncated header
    dataset = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(dataset) == 4
    with caplog.at_level(logging.WARNING, logger="diffdistill.data"):
        item = dataset[1]  # b.png is unreadable -> the next readable index, c.png
        assert item["index"] == 2
        assert to_uint8(item["pixel_values"])[:, 0, 0].tolist() == [0, 0, 255]
        assert dataset.skipped.count == 1 and str(tmp_path / "b.png") in dataset.skipped
        assert dataset[1]["index"] == 2  # deterministic, counted again, logged once
        assert dataset.skipped.count == 2
        assert dataset[3]["index"] == 0  # the walk wraps around at the end
    assert sum("b.png" in r.getMessage() for r in caplog.records) == 1
    assert len(dataset.skipped) == 2  # b.png and d.png
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["index"].tolist() == [0, 2, 2, 0]


def test_all_files_corrupt_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    dataset = ImageCaptionFolder(tmp_path, resolution=8)
    with pytest.raises(RuntimeError, match="could be read"):
        dataset[0]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images found in {tmp_path}"):
        ImageCaptionFolder(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "missing", resolution=8)


def test_list_images_is_one_listing_for_training_and_eval(tmp_path):
    """One lister (diffdistill.image_folder.list_images) for the datasets and for FID:
    sorted, recursive, any-case extensions incl. .gif, hidden files / folders skipped,
    and a folder without images is an error naming the folder and the extensions."""
    from diffdistill.eval import fid

    root = tmp_path / "imgs"
    for rel in ["b.png", "a.JPG", "anim.gif", "sub/deep/c.webp", "sub/a.png",
                ".hidden.png", "._b.png", ".cache/x.png", "sub/.thumbs/y.jpg"]:
        save(solid((10, 20, 30)), root / rel, format="GIF" if rel.endswith(".gif") else
             ("JPEG" if rel.lower().endswith(".jpg") else None))
    (root / "notes.txt").write_text("not an image")
    (root / "folder.png").mkdir()  # a folder named like an image is not an image
    expected = ["a.JPG", "anim.gif", "b.png", "sub/a.png", "sub/deep/c.webp"]

    found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == expected
    assert found == sorted(found) and all(p.is_file() for p in found)
    assert list_images(str(root)) == found
    assert fid.IMAGE_EXTENSIONS == data.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS
    # Training and evaluation see exactly these files, in this order.
    assert [p for p, _, _ in ImageCaptionFolder(root, resolution=8).samples] == found
    assert len(list(fid.iter_image_folder(root))) == len(expected)

    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)
    save(solid((0, 0, 0)), empty / ".cache" / "x.png")
    save(solid((0, 0, 0)), empty / ".hidden.png")
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as info:
        list_images(empty)
    assert str(empty) in str(info.value)
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match="no images"):
        list(fid.iter_image_folder(empty))
    # The datasets keep their own one-line error for an empty folder, and an empty class
    # folder is still just a class without images.
    with pytest.raises(ValueError, match=f"no images found in {empty}"):
        ImageCaptionFolder(empty, resolution=8)
    classes = tmp_path / "classes"
    save(solid((0, 0, 0)), classes / "cat" / "1.png")
    (classes / "dog").mkdir()
    dataset = ClassFolder(classes, resolution=8)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 1


def test_center_crop_coordinates_non_square(tmp_path):
    # 60 wide x 40 high, column x has value 4*x % 256: the crop's content is checkable.
    columns = (np.arange(60) * 4 % 256).astype(np.uint8)
    save(Image.fromarray(np.tile(columns, (40, 1))), tmp_path / "wide" / "w.png")
    item = ImageCaptionFolder(tmp_path / "wide", resolution=40)[0]
    assert item["original_size"] == (40, 60)
    assert item["crop_top_left"] == (0, 10)  # (60 - 40) / 2
    assert to_uint8(item["pixel_values"])[0, 0].tolist() == columns[10:50].tolist()
    # Resize 60x40 -> 24x16 (shorter side 16), then crop left = (24 - 16) / 2 = 4.
    item = ImageCaptionFolder(tmp_path / "wide", resolution=16)[0]
    assert item["original_size"] == (40, 60) and item["crop_top_left"] == (0, 4)
    # Tall 30x50 at 20: resize to 20x33 (50*20/30 = 33.3), top = round(13 / 2) = 6.
    save(solid((5, 5, 5), size=(30, 50)), tmp_path / "tall" / "t.png")
    item = ImageCaptionFolder(tmp_path / "tall", resolution=20)[0]
    assert item["original_size"] == (50, 30) and item["crop_top_left"] == (6, 0)
    assert item["pixel_values"].shape == (3, 20, 20)


def test_random_crop_and_flip_are_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        save(Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)),
             tmp_path / f"{i}.png")
    a = ImageCaptionFolder(tmp_path, 16, center_crop=False, random_flip=True, seed=3)
    b = ImageCaptionFolder(tmp_path, 16, center_crop=False, random_flip=True, seed=3)
    plain = ImageCaptionFolder(tmp_path, 16, center_crop=False, random_flip=False, seed=3)
    seen_flip = set()
    for epoch in range(12):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        x, y = a[1], b[1]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["crop_top_left"] == y["crop_top_left"]
        top, left = x["crop_top_left"]
        assert top == 0 and 0 <= left <= 8
        # 24x16 at 16 needs no resize: the output is an exact crop, flipped or not.
        raw = torch.from_numpy(np.array(Image.open(tmp_path / "1.png"))).permute(2, 0, 1).long()
        got = to_uint8(x["pixel_values"])
        flipped = torch.flip(raw, [-1])[:, :, left:left + 16]
        unflipped = raw[:, :, left:left + 16]
        if torch.equal(got, flipped):
            seen_flip.add(True)
        else:
            assert torch.equal(got, unflipped)
            seen_flip.add(False)
    assert seen_flip == {True, False}
    # The flip does not change which crop is drawn: with flips off, the same window is
    # taken and a flipped item is exactly its mirror, its left edge mirrored too.
    lefts = set()
    for epoch in range(12):
        a.set_epoch(epoch)
        plain.set_epoch(epoch)
        x, p = a[1], plain[1]
        lefts.add(p["crop_top_left"][1])
        if torch.equal(x["pixel_values"], p["pixel_values"]):
            assert x["crop_top_left"] == p["crop_top_left"]
        else:
            assert torch.equal(x["pixel_values"], torch.flip(p["pixel_values"], [-1]))
            assert x["crop_top_left"][1] == 24 - 16 - p["crop_top_left"][1]
    assert len(lefts) > 1  # random crops move between epochs


def test_classfolder(tmp_path):
    save(solid((255, 255, 255)), tmp_path / "golden_retriever" / "1.png")
    save(solid((0, 0, 0)), tmp_path / "cat" / "x" / "2.png")
    save(solid((0, 0, 0)), tmp_path / "cat" / "3.png")
    dataset = ClassFolder(tmp_path, resolution=8)
    assert dataset.classes == ["cat", "golden_retriever"]
    assert [dataset[i]["class_label"] for i in range(3)] == [0, 0, 1]
    assert dataset[2]["caption"] == "a photo of a golden retriever"
    assert dataset[0]["caption"] == "a photo of a cat"
    assert to_uint8(dataset[2]["pixel_values"]).min() == 255


# --------------------------------------------------------------------------------------
# Prompts, collate, factory, checks
# --------------------------------------------------------------------------------------


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n   \n  a dog in the rain  \nan ankle boot\n")
    prompts = PromptFile(path)
    assert len(prompts) == 3
    assert prompts[1] == {"caption": "a dog in the rain", "index": 1}
    batch = collate([prompts[0], prompts[2]])
    assert batch["caption"] == ["a cat", "an ankle boot"] and batch["index"].tolist() == [0, 2]
    with pytest.raises(IndexError):
        prompts[3]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptFile(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        PromptFile(tmp_path / "nope.txt")


def test_collate_types():
    items = [
        {"pixel_values": torch.full((3, 2, 2), float(i)), "caption": f"c{i}", "class_label": i,
         "original_size": (10 + i, 20), "crop_top_left": (0, i), "index": i}
        for i in range(3)
    ]
    batch = collate(items)
    assert batch["pixel_values"].shape == (3, 3, 2, 2) and batch["pixel_values"][2, 0, 0, 0] == 2
    assert batch["caption"] == ["c0", "c1", "c2"]
    assert batch["original_size"].tolist() == [[10, 20], [11, 20], [12, 20]]
    assert batch["crop_top_left"].dtype == torch.long
    assert batch["class_label"].tolist() == [0, 1, 2]


def test_build_dataset(tmp_path):
    (tmp_path / "p.txt").write_text("x\n")
    assert isinstance(build_dataset("prompts", path=tmp_path / "p.txt"), PromptFile)
    assert len(build_dataset("fashion_mnist", split="test", limit=5)) == 5
    with pytest.raises(ValueError, match="fashion_mnist, imagefolder, classfolder, prompts, "
                                         "webdataset"):
        build_dataset("lmdb")


def test_checks():
    check_resolution(512, 8)
    with pytest.raises(ValueError, match="resolution 100 is not divisible by the VAE "
                                         "downsampling factor 8"):
        check_resolution(100, 8)
    check_batch_size(8, 4, 2)
    with pytest.raises(ValueError, match="7 items.*global batch of 8"):
        check_batch_size(7, 4, 2)


# --------------------------------------------------------------------------------------
# Webdataset shards
# --------------------------------------------------------------------------------------


def png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    solid(color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples):
    with tarfile.open(path, "w") as archive:
        for key, fields in samples:
            for ext, payload in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    first = [(f"s0/{i:04d}", {"png": png_bytes((i, 0, 0)), "txt": f"red {i}".encode()})
             for i in range(5)]
    first.append(("s0/bad", {"png": b"garbage", "txt": b"broken"}))
    second = [(f"{i:04d}", {"jpg": png_bytes((0, i, 0)),  # PIL sniffs the format
                            "json": json.dumps({"caption": f"green {i}"}).encode(),
                            "cls": str(i).encode()}) for i in range(4)]
    second.append(("0009", {"txt": b"no image at all"}))
    write_shard(tmp_path / "shard-00.tar", first)
    write_shard(tmp_path / "shard-01.tar", second)
    good = {f"{tmp_path}/shard-00.tar/s0/{i:04d}" for i in range(5)}
    good |= {f"{tmp_path}/shard-01.tar/{i:04d}" for i in range(4)}
    return tmp_path, good


def test_webdataset_two_processes_disjoint_and_complete(shards):
    folder, good = shards
    pattern = str(folder / "shard-{00..01}.tar")
    keys_per_rank, datasets = [], []
    for rank in range(2):
        dataset = WebDatasetShards(pattern, resolution=8, process_index=rank, num_processes=2)
        items = list(dataset)
        datasets.append(dataset)
        keys_per_rank.append([item["key"] for item in items])
        for item in items:
            assert item["pixel_values"].shape == (3, 8, 8)
            if "shard-00" in item["key"]:
                assert item["caption"] == f"red {item['index']}" and item["class_label"] == -1
                assert to_uint8(item["pixel_values"])[:, 0, 0].tolist() == [item["index"], 0, 0]
            else:
                assert item["caption"] == f"green {item['index']}"
                assert item["class_label"] == item["index"]
    a, b = map(set, keys_per_rank)
    assert not a & b and a | b == good
    assert sum(len(k) for k in keys_per_rank) == len(good)
    assert sum(d.skipped.count for d in datasets) == 2  # bad image + sample without image


def test_webdataset_more_readers_than_shards_splits_by_sample(shards):
    folder, good = shards
    seen = []
    for rank in range(3):
        dataset = WebDatasetShards(folder, resolution=8, process_index=rank, num_processes=3)
        seen.append({item["key"] for item in dataset})
    assert sum(len(s) for s in seen) == len(good) and set().union(*seen) == good
    # DataLoader workers are readers too: 1 process x 2 workers, still disjoint and complete.
    dataset = WebDatasetShards(sorted(str(p) for p in folder.glob("*.tar")), 8,
                               process_index=0, num_processes=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == len(set(keys)) == len(good) and set(keys) == good


def test_webdataset_truncated_shard_is_not_fatal(shards):
    folder, good = shards
    path = folder / "shard-01.tar"
    with tarfile.open(path) as archive:
        cut = archive.getmember("0002.jpg").offset_data + 10  # inside sample 0002's image
    path.write_bytes(path.read_bytes()[:cut])
    dataset = WebDatasetShards([folder / "shard-00.tar", path], 8)
    keys = {item["key"] for item in dataset}
    # Complete samples before the cut survive; the partial one is dropped, not guessed.
    assert keys == {k for k in good if "shard-00" in k} | {f"{path}/0000", f"{path}/0001"}
    assert dataset.skipped.count == 2 and str(path) in dataset.skipped


# --------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------


def test_embedding_cache_round_trip_and_persistence(tmp_path):
    cache = EmbeddingCache(tmp_path, "latents-vae1")
    batch = torch.randn(4, 4, 8, 8).half()
    for i in range(4):
        cache.put(f"img{i}", batch[i])  # slices share storage with the batch
    assert torch.equal(cache.get("img2"), batch[2]) and cache.get("nope") is None
    written = cache.flush()
    assert written is not None and written.suffix == ".safetensors"
    assert not list((tmp_path / "latents-vae1").glob("*.tmp"))
    cache.put("img9", torch.arange(3))
    cache.flush()
    fresh = EmbeddingCache(tmp_path, "latents-vae1")
    assert len(fresh) == 5 and "img0" in fresh
    got = fresh.get("img2")
    assert got.dtype == torch.float16 and torch.equal(got, batch[2])
    assert fresh.get("img9").tolist() == [0, 1, 2]
    # Namespaces are separate, and a later write of a key wins over an earlier one.
    assert len(EmbeddingCache(tmp_path, "prompts")) == 0
    fresh.put("img9", torch.tensor([7]))
    fresh.flush()
    assert EmbeddingCache(tmp_path, "latents-vae1").get("img9").tolist() == [7]
    with pytest.raises(ValueError, match="namespace"):
        EmbeddingCache(tmp_path, "../escape")


def test_embedding_cache_auto_flush_shards(tmp_path):
    cache = EmbeddingCache(tmp_path, "ns", shard_size=3, max_loaded_shards=1)
    for i in range(7):
        cache.put(hash_key("prompt", i), torch.tensor([float(i)]))
    assert len(list((tmp_path / "ns").glob("*.safetensors"))) == 2  # 3 + 3, 1 pending
    cache.flush()
    reopened = EmbeddingCache(tmp_path, "ns", max_loaded_shards=1)
    # Reading across shards with a one-shard memory budget still returns every value.
    assert [reopened.get(hash_key("prompt", i)).item() for i in range(7)] == list(range(7))


def test_cached_map_computes_only_missing(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((2,), float(len(p))) for p in prompts])

    prompts = ["a", "bb", "ccc", "bb", "dddd", "eeeee"]
    keys = [hash_key(p) for p in prompts]
    cache = EmbeddingCache(tmp_path, "text")
    out = cache.cached_map(keys, encode, batch_size=2, inputs=prompts)
    assert [o[0].item() for o in out] == [1, 2, 3, 2, 4, 5]
    assert calls == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]  # duplicate "bb" computed once
    calls.clear()
    again = EmbeddingCache(tmp_path, "text")
    more = ["bb", "ffffff", "a"]
    out = again.cached_map([hash_key(p) for p in more], encode, batch_size=8, inputs=more)
    assert calls == [["ffffff"]]
    assert [o[0].item() for o in out] == [2, 6, 1]
    calls.clear()
    # Without inputs compute_fn receives the keys; a wrong-length result is an error.
    assert again.cached_map(["k1"], lambda ks: [torch.tensor(len(ks[0]))])[0].item() == 2
    with pytest.raises(ValueError, match="returned 1 results for 2 inputs"):
        again.cached_map(["x1", "x2"], lambda ks: [torch.zeros(1)])
    assert os.listdir(tmp_path) == ["text"]


def test_webdataset_streams_from_pipe_and_file_url(shards):
    folder, good = shards
    first = {k for k in good if "shard-00" in k}
    url = (folder / "shard-00.tar").as_uri()
    assert {item["key"].replace(url, str(folder / "shard-00.tar")) for item in
            WebDatasetShards(url, 8)} == first
    piped = WebDatasetShards(f"pipe:cat {folder / 'shard-00.tar'}", 8)
    assert len(list(piped)) == 5
    next(iter(piped))  # stopping early closes the pipe instead of hanging
