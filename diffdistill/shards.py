"""Webdataset tar shards read with :mod:`tarfile` (the optional ``webdataset`` package is not
needed for local shards): :class:`WebDatasetShards`."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from diffdistill.image_folder import load_image_rgb
from diffdistill.items import SkipLog, _ImageTransform, _stable_int, image_item

logger = logging.getLogger("diffdistill.data")


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
        return image_item(self.transform(image, sample_id, self.epoch), caption, label,
                          position, key=sample_id)

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
