"""The reference set of a bench: how many images, and its feature statistics (precomputed,
shipped with the world, or computed and cached).

Two references of the embedded world: ``fashion_mnist_test`` (the test split, which reports
results) and ``fashion_mnist_val`` (training images 50000–59999, against which knobs and
checkpoints are chosen). Statistics carry their source in their metadata and a reference of
one kind refuses statistics of the other, so a choice can never be made on the test split by
passing its file where validation statistics are expected (or the other way round)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from diffdistill.eval.bench_config import BenchReference

from diffdistill.config import ConfigError

log = logging.getLogger("diffdistill.eval")

#: ``source`` metadata of Fashion-MNIST test-split statistics (as the world ships them)
FMNIST_SOURCE = "fashion-mnist/test"
#: ``source`` metadata of the validation images' statistics (diffdistill.fmnist.VAL_RANGE)
FMNIST_VAL_SOURCE = "fashion-mnist/train[50000:60000]"


@dataclass(frozen=True)
class FmnistReference:
    split: str  # diffdistill.fmnist split
    source: str  # FeatureStats ``source`` metadata
    text: str  # how results name it


#: the Fashion-MNIST reference kinds of a bench (``reference.kind``)
FMNIST_REFERENCES = {
    "fashion_mnist_test": FmnistReference("test", FMNIST_SOURCE, "Fashion-MNIST test split"),
    "fashion_mnist_val": FmnistReference(
        "val", FMNIST_VAL_SOURCE,
        "Fashion-MNIST validation images (training images 50000-59999)"),
}


def fmnist_reference(ref: BenchReference) -> FmnistReference | None:
    """The Fashion-MNIST reference a bench reference names (None for a folder)."""
    return FMNIST_REFERENCES.get(ref.kind)


def _world_stats_file(detector_name: str, split: str = "test") -> Path | None:
    """The embedded world's shipped statistics of ``split`` for this detector, if present."""
    try:
        from diffdistill.world import REF_STATS, ref_stats_path
    except ImportError:  # pragma: no cover - the world is part of the package
        return None
    for key, name in REF_STATS.items():
        if name == detector_name:
            path = ref_stats_path(key, split=split)
            return path if path.is_file() else None
    return None


def _eval_resolution(ref: BenchReference) -> int | None:
    if ref.resolution is not None:
        return int(ref.resolution)
    return 32 if fmnist_reference(ref) is not None else None


def _check_stats_source(path, fm: FmnistReference, kind: str) -> None:
    """Refuse statistics of another reference (e.g. test-split statistics given to a
    validation reference): their ``source`` metadata must be this kind's."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            source = json.loads(str(data["meta_json"])).get("source")
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"reference.stats: {path} is not a FeatureStats file ({e})") from None
    if source != fm.source:
        raise ConfigError(
            f"reference.stats: {path} holds statistics of {source!r}, but reference.kind="
            f"{kind} is {fm.source!r}; validation and test statistics never mix (choose on "
            "fashion_mnist_val, report on fashion_mnist_test)")


def reference_count(ref: BenchReference) -> int:
    """How many reference images the statistics are computed from."""
    fm = fmnist_reference(ref)
    if fm is not None:
        from diffdistill.fmnist import load_fashion_mnist

        n = len(load_fashion_mnist(fm.split, ref.fmnist_root or None)[1])
    else:
        from diffdistill.image_folder import list_images

        folder = Path(ref.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference.images: folder {folder} does not exist")
        n = len(list_images(folder))
    return n if ref.max_images is None else min(n, ref.max_images)


def _check_reference_size(count: int, num_samples: int, ref: BenchReference, what: str,
                          fix: str = "Add reference images, lower num_samples, or set "
                                     "reference.allow_fewer=true to evaluate anyway") -> None:
    if count < num_samples and not ref.allow_fewer:
        raise ConfigError(
            f"reference: {what} has {count} images but num_samples={num_samples}; a Fréchet "
            "distance against a smaller reference set is not comparable with published "
            f"numbers. {fix}")


def reference_statistics(detector, ref: BenchReference, *, cache_dir=None,
                         accelerator=None, batch_size: int = 64, progress: bool = False):
    """The reference ``FeatureStats`` for ``detector``: a precomputed file from
    ``ref.stats`` (its extractor, resize mode and resolution must match, else refused), the
    embedded world's shipped file when it is of exactly this kind, or computed (and cached in
    ``cache_dir``) with :func:`diffdistill.eval.fid.reference_stats`."""
    from diffdistill.eval.fid import FeatureStats, reference_stats

    res = _eval_resolution(ref)
    expected = {"extractor": detector.name, "resize_mode": detector.resize_mode,
                "resolution": res if res is not None else "native"}
    fm = fmnist_reference(ref)
    if detector.name in ref.stats:
        if fm is not None:
            _check_stats_source(ref.stats[detector.name], fm, ref.kind)
        return FeatureStats.load(ref.stats[detector.name], **expected)
    if fm is not None:
        shipped = _world_stats_file(detector.name, fm.split)
        if shipped is not None and ref.max_images is None:
            try:
                return FeatureStats.load(shipped, source=fm.source, **expected)
            except ValueError as e:
                log.info("not using the shipped statistics: %s", e)
        from diffdistill.fmnist import fashion_mnist_uint8

        images = fashion_mnist_uint8(fm.split, res, root=ref.fmnist_root or None,
                                     limit=ref.max_images)
        return reference_stats(detector, images, cache_dir, source_id=fm.source,
                               resolution=res, batch_size=batch_size, progress=progress,
                               accelerator=accelerator)
    return reference_stats(detector, ref.images, cache_dir, resolution=res,
                           max_count=ref.max_images, batch_size=batch_size, progress=progress,
                           accelerator=accelerator)



def reference_features(detector, ref: BenchReference, count: int, *, cache_dir=None,
                       accelerator=None, batch_size: int = 64):
    """``[count, D]`` fp32 features of the first ``count`` reference images (sorted order;
    processed as for :func:`reference_statistics`), for precision / recall. Each process
    extracts every world-th image and the shards are gathered; cached as ``.npz`` in
    ``cache_dir`` under (detector, resize mode, resolution, count, source)."""
    import numpy as np
    import torch
    from diffdistill.eval.features import iter_feature_batches
    from diffdistill.eval.fid import iter_image_folder
    from diffdistill.eval.generation import _gather_objects, _rank_world

    from diffdistill.image_folder import list_images

    res = _eval_resolution(ref)
    fm = fmnist_reference(ref)
    source = fm.source if fm is not None else str(Path(ref.images).resolve())
    key = {"extractor": detector.name, "resize_mode": detector.resize_mode,
           "resolution": res if res is not None else "native", "count": int(count),
           "source": source}
    path = None
    if cache_dir is not None:
        import hashlib
        import json

        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"reffeats-{detector.name}-n{count}-{digest}.npz"
        if path.is_file():
            with np.load(path) as f:
                return torch.from_numpy(f["features"].astype(np.float32))
    rank, world = _rank_world(accelerator)
    if fm is not None:
        from diffdistill.fmnist import fashion_mnist_uint8

        images = fashion_mnist_uint8(fm.split, res, root=ref.fmnist_root or None,
                                     limit=min(count, ref.max_images or count))
        if len(images) < count:
            raise ConfigError(f"reference: the {fm.text} has {len(images)} "
                              f"images, precision / recall needs {count}")
        items = images[rank::world]
    else:
        files = list_images(Path(ref.images))[:min(count, ref.max_images or count)]
        if len(files) < count:
            raise ConfigError(f"reference.images holds {len(files)} images, precision / "
                              f"recall needs {count}")
        items = iter_image_folder(None, res, files=files[rank::world])
    mine = torch.cat([f.float().cpu() for f in iter_feature_batches(
        detector, items, batch_size=batch_size)])
    shards = _gather_objects(mine, world)
    feats = torch.empty(count, mine.shape[1])
    for r, shard in enumerate(shards):  # rank r held images r, r + world, ...
        feats[r::world] = shard
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, features=feats.numpy(), **{k: str(v) for k, v in key.items()})
        tmp.replace(path)
    return feats
