"""Evaluation harness: sample N images per (model, step count) through the shared sampler,
split across processes, and score them — Fréchet distances (FID only on Inception), CLIP
score, seconds per image and peak memory. ``diffdistill bench`` and the Trainer's periodic
quick metric both run through :func:`generate_for_eval`.

Protocol (what the numbers mean; the report states it again)
------------------------------------------------------------
* Sample ``i`` (0 ≤ i < N) uses seed ``seeds_start + i`` (one CPU generator per sample, so
  an image depends only on its seed and prompt — not on batch size or process count) and
  prompt ``i``: the world's class ``i % 10`` with a fixed caption template for text models,
  class label ``i % num_classes`` for class-conditional pixel models, or line ``i`` of a
  captions file (COCO). Every model in a bench sees the same seeds and prompts.
* Processes: the N samples are cut into batches of ``batch_size`` first, and rank r takes a
  contiguous block of whole batches. Every image is therefore generated in exactly the batch
  it would be in with one process, so a multi-process run reproduces the one-process images
  and features, not just their distribution. Features go straight into streaming
  :class:`~diffdistill.eval.fid.FeatureStats` (never stored), which are all-reduced.
* Evaluation resolution: when the reference has one (COCO: 256), reference images are
  centre-cropped and LANCZOS-resized to it (``diffdistill.eval.fid``) and generated images
  go through the very same function before the detectors; the detectors then apply their
  own resizing (e.g. clean-fid bicubic to 299 for Inception).
* Fréchet distance names: "FID" only for the Inception-v3 network of Heusel et al.;
  "FID-FMNIST" for the embedded world's Fashion-MNIST network; "FD-<name>" otherwise (e.g.
  "FD-EffNetLite0"). CLIP score is the mean plain cosine similarity (scale 1, unclamped) of
  the open_clip image and caption embeddings, computed on the generated images as they
  come out of the model.
* Seconds per image: wall time of generation only (sampler + VAE decode, CUDA synchronised),
  after one untimed warm-up batch, summed over processes and divided by N — the cost of one
  image on one device at this batch size. Peak memory, also of generation only:
  ``torch.cuda.max_memory_allocated`` on CUDA (the generator's weights included, the
  resident evaluation networks subtracted); on CPU how far the process's resident set grew
  (sampled from ``/proc/self/statm``, at least the growth of ``getrusage``'s peak), which
  excludes the already loaded weights. The label travels with the number.
* COCO-2014 zero-shot: a captions file (``.txt`` one per line, ``.jsonl``, a JSON list, or
  COCO's ``captions_val2014.json``, of which the first caption of each image is used in
  image-id order) and a folder of reference images; 30k (or 10k) samples, as in the
  distillation papers' tables.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from diffdistill.eval.bench_config import (
    BenchClip,
    BenchConfig,
    BenchReference,
    load_bench_config,
)
from diffdistill.eval.eval_model import EvalModel, load_eval_model, recorded_step_counts
from diffdistill.eval.generation import generate_for_eval
from diffdistill.eval.precision_recall import precision_recall
from diffdistill.eval.prompts import EvalPrompts, build_eval_prompts
from diffdistill.eval.reference import (
    FMNIST_REFERENCES,
    _check_reference_size,
    _eval_resolution,
    fmnist_reference,
    reference_count,
    reference_features,
    reference_statistics,
)

from diffdistill.config import ConfigError, torch_dtype
from diffdistill.fingerprint import weights_sha256

log = logging.getLogger("diffdistill.eval")

__all__ = ["bench_command", "quick_eval", "run_bench"]


def _ranges(values: Sequence[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]] (half-open runs)."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out



# ----------------------------------------------------------------------------- bench


def _import_plugins(modules: Sequence[str]) -> None:
    import diffdistill.world  # noqa: F401  (registers the world's detectors, lazily)

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r} ({e})") from None


def _build_detector(name: str, options: dict, device):
    from diffdistill.eval.features import get_detector

    try:
        return get_detector(name, device=device, **dict(options.get(name) or {}))
    except KeyError as e:
        raise ConfigError(f"detectors: {e.args[0]}") from None


#: the world's independent CLIP judge, the default CLIP score on the world's reference
WORLD_JUDGE = "world-clip-judge"


def _build_clip(c: BenchClip | None, options: dict, device, ref: BenchReference | None = None):
    if c is None:
        return None
    if c.detector == "auto":
        if ref is None or fmnist_reference(ref) is None:
            return None
        return _build_detector(WORLD_JUDGE, options, device)
    if c.detector:
        return _build_detector(c.detector, options, device)
    from diffdistill.eval.clip_detector import ClipDetector

    return ClipDetector(c.model, pretrained_path=c.weights or None,
                        config_path=c.config or None, device=device)


def _world_classifier(detectors, cfg: BenchConfig, prompts: EvalPrompts, device):
    """The world's Fashion-MNIST classifier for class agreement: only when the prompts are
    the world's classes and the reference is Fashion-MNIST (else None)."""
    if fmnist_reference(cfg.reference) is None or prompts.captions is not None:
        return None
    for d in detectors:
        if d.name == "fmnist-net":
            return d
    return _build_detector("fmnist-net", cfg.detector_options, device)


def judged_by_its_reward(info: dict, judge_hashes: set) -> bool:
    """True when one of the reward networks an export records (``reward_networks``, with
    the sha256 of their weight files) is the CLIP judge itself (same file content)."""
    return any(h in judge_hashes for net in info.get("reward_networks") or ()
               for h in (net.get("sha256") or {}).values())


def _accelerator(cfg: BenchConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    return Accelerator(cpu=cpu)


def _protocol(cfg: BenchConfig, prompts: EvalPrompts, ref_count: int, detectors, clip,
              pr_detector=None, classifier=None) -> dict:
    from diffdistill.eval.fid import metric_name

    r = cfg.reference
    res = _eval_resolution(r)
    fm = fmnist_reference(r)
    if fm is not None:
        ref_text = (f"{fm.text} ({ref_count} images, padded to 32 px"
                    + (f", resized to {res} px)" if res != 32 else ")"))
    else:
        ref_text = f"{ref_count} images from {r.images}"
    if res is not None and r.kind == "folder":
        ref_text += f", centre-cropped and LANCZOS-resized to {res} px"
    prompts_text = (f"captions file {cfg.prompts.file or r.captions} (first {cfg.num_samples})"
                    if prompts.captions is not None else
                    f"world classes: sample i uses class i % 10 (template {prompts.template}) "
                    "or label i % num_classes")
    return {
        "num_samples": cfg.num_samples,
        "seeds": [cfg.seeds_start, cfg.seeds_start + cfg.num_samples],
        "prompts": prompts_text,
        "reference": ref_text,
        "reference_kind": r.kind,
        "reference_count": ref_count,
        "evaluation_resolution": res,
        "fd": {metric_name(d): f"Fréchet distance on {d.name} features ({d.resize_mode} resize)"
               for d in detectors},
        "clip_score": (None if clip is None else
                       f"mean cosine similarity (scale 1, unclamped) of {clip.name} image and "
                       f"caption embeddings{' with prefix ' + repr(cfg.clip.prefix) if cfg.clip.prefix else ''}"),
        "sec_per_image": "generation only (sampler + decode), after one warm-up batch, "
                         "summed over processes / N" if cfg.warmup else
                         "generation only (sampler + decode), no warm-up, summed over "
                         "processes / N",
        "precision_recall": (None if pr_detector is None else
                             f"improved precision / recall (Kynkäänniemi et al. 2019), "
                             f"k = {cfg.precision_recall_k}, on {pr_detector.name} features: "
                             f"the N samples against the first N reference images"),
        "class_agreement": (None if classifier is None else
                            f"share of samples the world's Fashion-MNIST classifier "
                            f"({classifier.name}) puts in the class their prompt asked for"),
        "peak_memory": "during generation only, each row its own peak; cuda_max_allocated: "
                       "torch.cuda.max_memory_allocated (the generator's weights included, "
                       "the evaluation networks not); cpu_peak_rss_delta: how far the "
                       "process's resident set grew, freed heap returned to the OS (glibc "
                       "malloc_trim) before each batch (weights already loaded not counted); "
                       "n/a where that cannot be measured",
        "batch_size": cfg.batch_size,
    }


def _check_model_paths(cfg: BenchConfig) -> None:
    """Every model folder is a model and every LoRA folder exists (one line naming the
    entry, else), before any model or reference is loaded."""
    from diffdistill.backbone import validate_model_folder
    from diffdistill.world import resolve_model_path

    for i, m in enumerate(cfg.models):
        for key, value in (("path", m.path), ("lora", m.lora)):
            if value and not Path(resolve_model_path(value)).exists():
                raise ConfigError(f"models[{i}].{key}={value!r} ({m.name}) does not exist")
        try:
            validate_model_folder(resolve_model_path(m.path))
        except (ValueError, OSError) as e:
            raise ConfigError(f"models[{i}].path ({m.name}): {e}") from None


def run_bench(cfg: BenchConfig, *, accelerator=None, command: str | None = None):
    """Evaluate every model × steps of ``cfg``; rank 0 writes the report into ``cfg.out``.
    Returns :class:`diffdistill.eval.report.BenchResults` (on every rank)."""
    from diffdistill.eval.fid import fid_from_stats, metric_name
    from diffdistill.eval.report import BenchResults, BenchRow, machine_info, write_report

    _import_plugins(cfg.imports)
    acc = accelerator or _accelerator(cfg)
    device = acc.device
    if cfg.dtype != "fp32" and device.type != "cuda":
        raise ConfigError(f"dtype={cfg.dtype} needs CUDA (this run is on {device}); "
                          "set dtype=fp32")
    out = Path(cfg.out)
    prompts = build_eval_prompts(cfg)
    ref = cfg.reference
    ref_count = reference_count(ref)
    _check_reference_size(ref_count, cfg.num_samples, ref,
                          f"the {fmnist_reference(ref).text}" if fmnist_reference(ref)
                          else f"reference.images {ref.images}")
    _check_model_paths(cfg)  # before minutes of reference features
    res = _eval_resolution(ref)
    detectors = [_build_detector(n, cfg.detector_options, device) for n in cfg.detectors]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "ref_stats"
    refs = {}
    for d in detectors:
        refs[d.name] = reference_statistics(d, ref, cache_dir=cache, accelerator=acc,
                                            batch_size=cfg.batch_size,
                                            progress=cfg.progress and acc.is_main_process)
        _check_reference_size(refs[d.name].count, cfg.num_samples, ref,
                              f"the {d.name} reference statistics")
    clip = _build_clip(cfg.clip, cfg.detector_options, device, ref)
    judge_hashes = set(weights_sha256(getattr(clip, "weights_path", None)).values())
    pr_count = min(cfg.num_samples, ref_count)  # fewer only with reference.allow_fewer
    # k nearest neighbours need more than k points (a tiny allow_fewer reference: n/a)
    pr_detector = detectors[0] if cfg.precision_recall and detectors else None
    pr_possible = pr_count > cfg.precision_recall_k
    ref_feats = None
    if pr_detector is not None and pr_possible:
        ref_feats = reference_features(pr_detector, ref, pr_count, cache_dir=cache,
                                       accelerator=acc, batch_size=cfg.batch_size)
    classifier = _world_classifier(detectors, cfg, prompts, device)
    metrics = [metric_name(d) for d in detectors] + (["CLIP score"] if clip is not None else [])
    metrics += (["precision", "recall"] if pr_detector is not None else [])
    metrics += (["class agreement"] if classifier is not None else [])
    seeds = list(range(cfg.seeds_start, cfg.seeds_start + cfg.num_samples))
    autocast = torch_dtype(cfg.dtype) if (cfg.dtype != "fp32" and device.type == "cuda") else None
    rows, grid_rows = [], []
    for spec in cfg.models:
        model = load_eval_model(spec, device=device, dtype=torch_dtype(cfg.dtype))
        model.compile = cfg.compile
        for steps in spec.steps or recorded_step_counts(model.info):
            gen = generate_for_eval(model, seeds, num_steps=steps, prompts=prompts,
                                    detectors=detectors, clip=clip,
                                    clip_prefix=cfg.clip.prefix if cfg.clip else "",
                                    resolution=res, batch_size=cfg.batch_size,
                                    grid_samples=cfg.grid_samples, accelerator=acc,
                                    progress=cfg.progress, warmup=cfg.warmup or cfg.compile,
                                    autocast_dtype=autocast, classifier=classifier,
                                    keep_features=[pr_detector.name] if pr_detector else [])
            values = {metric_name(d): fid_from_stats(gen.stats[d.name], refs[d.name])
                      for d in detectors}
            if clip is not None:
                values["CLIP score"] = gen.clip_score
            if pr_detector is not None and not pr_possible:
                values.update(precision=None, recall=None)
            elif pr_detector is not None:
                pr = precision_recall(ref_feats, gen.features[pr_detector.name][:pr_count],
                                      k=cfg.precision_recall_k)
                values.update(precision=pr.precision, recall=pr.recall)
            if classifier is not None:
                values["class agreement"] = gen.class_agreement
            rows.append(BenchRow(
                model=spec.name, steps=steps, sampler=model.sampler,
                guidance_scale=model.guidance_scale, timesteps=gen.timesteps,
                num_samples=gen.count, metrics=values, sec_per_image=gen.sec_per_image,
                peak_memory_mb=(None if gen.peak_memory_bytes is None
                                else gen.peak_memory_bytes / 2**20),
                peak_memory_kind=gen.peak_memory_kind, path=spec.path, lora=spec.lora,
                seed_ranges_by_rank=[_ranges(s) for s in gen.seeds_by_rank],
                judge_is_reward=judged_by_its_reward(model.info, judge_hashes)))
            grid_rows.append(gen.grid)
            if acc.is_main_process:
                log.info("%s @ %d step(s): %s, %.4f s/img", spec.name, steps,
                         ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a"
                                   for k, v in values.items()), gen.sec_per_image)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from diffdistill.config import config_to_dict

    results = BenchResults(
        rows=rows, metrics=metrics,
        protocol=_protocol(cfg, prompts, ref_count, detectors, clip, pr_detector, classifier),
        machine=machine_info(device, acc.num_processes),
        command=command if command is not None else " ".join(sys.argv),
        config=config_to_dict(cfg), grid_seeds=seeds[:cfg.grid_samples])
    if acc.is_main_process:
        write_report(results, grid_rows if cfg.grid_samples else None, out)
        from diffdistill.eval.convergence import collect, training_run_of, write_convergence

        runs = {m.name: training_run_of(m.lora or m.path) for m in cfg.models}
        curves = collect({k: v for k, v in runs.items() if v is not None})
        if curves:  # students exported by a run with periodic evals: how they got there
            write_convergence(curves, out)
        from diffdistill.eval.html_report import write_bench_html

        write_bench_html(results, out)
    acc.wait_for_everyone()
    return results


def bench_command(config: str, overrides: Sequence[str] = ()) -> int:
    """``diffdistill bench BENCH.yaml [key=value ...]``."""
    cfg = load_bench_config(config, overrides)
    results = run_bench(cfg, command=" ".join(["diffdistill bench", config, *overrides]))
    print(f"wrote {len(results.rows)} rows to {Path(cfg.out) / 'results.md'}")
    return 0


# ----------------------------------------------------------------------------- trainer


def _metric_key(metric: str) -> str:
    """A metric's name as a log key: "FID-FMNIST" → "fid_fmnist"."""
    return re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")


def _quick_reference(spec: str, detector_name: str, resolution: int) -> BenchReference:
    """``eval.reference``: fashion_mnist_val / fashion_mnist_test, a folder of images, or a
    FeatureStats .npz."""
    p = Path(spec)
    if spec in FMNIST_REFERENCES:
        return BenchReference(kind=spec, resolution=resolution)
    if p.suffix == ".npz":  # whatever it was computed from (its metadata says)
        return BenchReference(kind="folder", resolution=resolution, stats={detector_name: str(p)})
    return BenchReference(kind="folder", images=str(p), resolution=resolution)


def quick_eval(trainer, spec: EvalModel) -> dict[str, float]:
    """The Trainer's periodic metric (``cfg.eval``): ``num_samples`` images from seeds
    0..N−1 per step count in ``eval.steps``, Fréchet distance on ``eval.detector`` against the
    reference at ``data.resolution``. Returns e.g. ``{"eval/fid_fmnist_1step": ...}``. The
    detector and the reference statistics are built once per trainer. With
    ``eval.precision_recall`` also ``eval/precision_<N>step`` / ``eval/recall_<N>step``
    against the first ``num_samples`` reference images (features cached in the run's
    ``eval_cache``)."""
    from diffdistill.eval.fid import fid_from_stats, metric_name

    e = trainer.cfg.eval
    cache = trainer.__dict__.setdefault("_quick_eval_cache", {})
    if "detector" not in cache:
        _import_plugins(())
        det = _build_detector(e.detector, {}, trainer.device)
        ref = _quick_reference(e.reference, det.name, trainer.cfg.data.resolution)
        stats = reference_statistics(det, ref, cache_dir=Path(trainer.out) / "eval_cache",
                                     accelerator=trainer.accelerator)
        _check_reference_size(stats.count, e.num_samples, ref, f"eval.reference {e.reference}",
                              fix="Lower eval.num_samples or use a larger eval.reference")
        cache.update(detector=det, reference=stats)
        if e.precision_recall:
            cache["reference_features"] = reference_features(
                det, ref, e.num_samples, cache_dir=Path(trainer.out) / "eval_cache",
                accelerator=trainer.accelerator)
    det, ref_stats = cache["detector"], cache["reference"]
    seeds = list(range(e.num_samples))
    label = _metric_key(metric_name(det))
    out = {}
    for steps in e.steps:
        gen = generate_for_eval(spec, seeds, num_steps=steps, detectors=[det],
                                resolution=trainer.cfg.data.resolution,
                                batch_size=min(64, len(seeds)), accelerator=trainer.accelerator,
                                keep_features=[det.name] if e.precision_recall else [])
        out[f"eval/{label}_{steps}step"] = fid_from_stats(gen.stats[det.name], ref_stats)
        if e.precision_recall:
            pr = precision_recall(cache["reference_features"], gen.features[det.name])
            out[f"eval/precision_{steps}step"] = pr.precision
            out[f"eval/recall_{steps}step"] = pr.recall
    return out
