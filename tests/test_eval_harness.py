"""Evaluation harness: sharding, generate_for_eval (equal to the shared sampler, the same
images with 1 and 2 processes), reference statistics (COCO-style folder, cache, refusal) and
the Trainer's periodic quick metric. The stand-in detectors come from ``standins`` (the
2-process run registers them through ``imports: [standins]``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffdistill.eval.bench_config import BenchReference
from diffdistill.eval.eval_model import EvalModel
from diffdistill.eval.fid import FeatureStats, fid_from_stats
from diffdistill.eval.generation import generate_for_eval, resize_for_eval, shard_batches
from diffdistill.eval.prompts import EvalPrompts
from diffdistill.eval.reference import reference_count, reference_statistics
from PIL import Image
from standins import ConvStandIn, tiny_clip

from diffdistill.backbone import load_backbone
from diffdistill.config import ConfigError, build_config
from diffdistill.fmnist import caption_for_class, fashion_mnist_uint8
from diffdistill.sampling import ddim_timesteps, generate

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- stand-ins


def stats_of(detector, images, **meta) -> FeatureStats:
    return FeatureStats.for_detector(detector, **meta).update(detector(images))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_batches_cover_every_sample_once_in_single_process_batches(n, batch_size, world):
    single = [list(b) for b in shard_batches(n, batch_size)]
    parts = [[list(b) for b in shard_batches(n, batch_size, r, world)] for r in range(world)]
    flat = [i for part in parts for b in part for i in b]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # none missing, none twice
    assert [b for part in parts for b in part] == single  # same batches as one process
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced to one batch


# ----------------------------------------------------------------------------- generation


class _ClassOf:
    """A stand-in classifier that knows sample k of a call-ordered stream is ``labels[k]``
    and answers wrongly for the first ``flip`` samples."""

    def __init__(self, labels, flip=0):
        self.labels, self.flip, self.seen = list(labels), flip, 0

    def predict(self, images):
        out = []
        for _ in range(len(images)):
            k = self.seen
            out.append((self.labels[k] + 1) % 10 if k < self.flip else self.labels[k])
            self.seen += 1
        return torch.tensor(out)


def _pixel_model(pixel_dir, gs=2.0):
    bb = load_backbone(str(pixel_dir))
    return bb, EvalModel("pixel", bb, bb.denoiser(), "ddim", guidance_scale=gs)


def test_generate_for_eval_equals_shared_sampler(pixel_dir):
    bb, model = _pixel_model(pixel_dir)
    det = ConvStandIn()
    seeds = list(range(100, 112))
    gen = generate_for_eval(model, seeds, num_steps=3, detectors=[det], batch_size=5,
                            grid_samples=12, warmup=True)
    labels = [i % 10 for i in range(12)]
    direct = generate(bb.denoiser(), seeds=seeds, shape=(3, 16, 16), sampler="ddim", num_steps=3,
                      cond_fn=lambda sl: bb.class_cond(labels[sl], guidance=True),
                      guidance_scale=2.0, batch_size=5, progress=False)
    assert torch.equal(gen.grid, direct)  # class i % 10, seed i, CFG 2: the very same images
    ref = stats_of(det, direct)
    assert gen.count == ref.count == 12
    assert torch.allclose(gen.stats[det.name].sum, ref.sum, rtol=1e-12, atol=1e-9)
    assert torch.allclose(gen.stats[det.name].outer, ref.outer, rtol=1e-12, atol=1e-9)
    assert gen.seeds_by_rank == [seeds]
    assert gen.timesteps == [float(t) for t in ddim_timesteps(
        3, spacing=bb.scheduler_config.get("timestep_spacing", "leading"),
        steps_offset=bb.scheduler_config.get("steps_offset", 0))]
    assert gen.sec_per_image > 0 and gen.gen_seconds > 0
    assert gen.peak_memory_kind == "cpu_peak_rss_delta" and gen.peak_memory_bytes >= 0
    assert gen.clip_score is None and gen.class_agreement is None and gen.features == {}
    # per-sample features (precision / recall) and class agreement with the asked class
    kept = generate_for_eval(model, seeds, num_steps=3, detectors=[det], batch_size=5,
                             keep_features=[det.name], classifier=_ClassOf(labels, flip=3))
    assert torch.allclose(kept.features[det.name], det(direct).float(), atol=1e-6)
    assert kept.class_agreement == 9 / 12  # the stand-in gets 3 of the 12 wrong
    # another batch size: the same images (one generator per seed), up to rounding
    other = generate_for_eval(model, seeds, num_steps=3, detectors=[det], batch_size=12,
                              grid_samples=3)
    assert other.grid.shape == (3, 3, 16, 16)
    assert (other.grid.int() - direct[:3].int()).abs().max() <= 1
    # a model against its own samples: Fréchet distance 0
    assert fid_from_stats(gen.stats[det.name], ref) == pytest.approx(0.0, abs=1e-9)


def test_text_model_captions_guidance_and_clip_score(sd_dir):
    from diffdistill.eval.clip_score import clip_score

    bb = load_backbone(str(sd_dir))
    clip = tiny_clip()
    captions = ["a red dress", "a sneaker", "a bag on a table", "an ankle boot", "a coat", "a shirt"]
    model = EvalModel("sd", bb, bb.denoiser(), "ddim", guidance_scale=3.0)
    gen = generate_for_eval(model, range(6), num_steps=2, prompts=EvalPrompts(captions=captions),
                            clip=clip, clip_prefix="", batch_size=4, grid_samples=6)
    direct = generate(bb.denoiser(), seeds=range(6), shape=(4, 16, 16), sampler="ddim",
                      num_steps=2, guidance_scale=3.0, batch_size=4, progress=False,
                      cond_fn=lambda sl: bb.encode_prompts(captions[sl], with_uncond=True),
                      decode=bb.decode_latents)
    assert torch.equal(gen.grid, direct)
    assert gen.clip_score == pytest.approx(clip_score(clip, direct, captions).mean, abs=1e-6)
    # default prompts: the world's classes with template 0
    assert EvalPrompts().caption(13) == caption_for_class(3, 0) == "a photo of a dress"
    assert EvalPrompts(template=1).caption(7) == caption_for_class(7, 1)
    with pytest.raises(ValueError, match="class labels"):
        EvalPrompts(captions=captions).label(0, 10)


def test_resize_for_eval_is_centre_crop_lanczos():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 3, 30, 44), dtype=torch.uint8, generator=g)
    out = resize_for_eval(imgs, 16)
    for img, got in zip(imgs, out):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())  # 44 wide, 30 high
        want = pil.crop((7, 0, 37, 30)).resize((16, 16), Image.LANCZOS)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(want))
    square = imgs[:, :, :16, :16].contiguous()
    assert resize_for_eval(square, 16) is square and resize_for_eval(imgs, None) is imgs


def test_cpu_peak_memory_counts_only_inside_the_block():
    from diffdistill.eval.memory import PeakMemory

    mem = PeakMemory(torch.device("cpu"))
    outside = torch.ones(160 * 2**20 // 4)  # 160 MiB outside any block: not counted
    outside.add_(1)
    time.sleep(0.03)
    del outside
    for mib in (32, 96):
        with mem:
            big = torch.ones(mib * 2**20 // 4)  # touched, then freed inside the block
            big.add_(1)
            time.sleep(0.05)
            del big
    peak = mem.close()
    assert mem.kind == "cpu_peak_rss_delta"
    assert 80 * 2**20 < peak < 150 * 2**20


def test_cpu_peak_memory_is_each_blocks_own_despite_a_reused_heap():
    """Two identical blocks read about the same: the second is not hidden by the freed heap
    the first left behind (without the trim it reads ~3 MiB instead of ~60)."""
    from diffdistill.eval.memory import PeakMemory

    mem = PeakMemory(torch.device("cpu"))
    assert mem.measured
    pinned, readings = [], []
    for _ in range(2):
        with mem:
            xs = [torch.ones(16384) for _ in range(1000)]  # 64 KiB each: heap, not mmap
            time.sleep(0.03)
            pinned += xs[::50]  # a few stay alive, so the heap cannot simply shrink
            del xs
        readings.append(mem.peak)
        mem.peak = 0
    mem.close()
    assert all(r > 45 * 2**20 for r in readings), [r / 2**20 for r in readings]


def test_peak_memory_reads_not_measured_where_the_heap_cannot_be_trimmed(pixel_dir,
                                                                          monkeypatch):
    """No glibc trim: the number would mean nothing, so the row carries None and the
    table prints n/a."""
    from diffdistill.eval import memory
    from diffdistill.eval.report import BenchResults, BenchRow, markdown_table

    monkeypatch.setattr(memory, "release_freed_memory", lambda: False)
    _, model = _pixel_model(pixel_dir)
    gen = generate_for_eval(model, [0, 1], num_steps=1, batch_size=2)
    assert gen.peak_memory_bytes is None
    row = BenchRow(model="m", steps=1, sampler="ddim", guidance_scale=1.0, timesteps=[999.0],
                   num_samples=2, metrics={}, sec_per_image=gen.sec_per_image,
                   peak_memory_mb=None, peak_memory_kind=gen.peak_memory_kind)
    md = markdown_table(BenchResults(rows=[row], metrics=[], protocol={}, machine={},
                                     command="x"))
    assert [line for line in md.splitlines() if line.startswith("| m ")][0].endswith("| n/a |")


# ----------------------------------------------------------------------------- reference


def test_reference_folder_coco_protocol_cache_and_refusal(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    g = np.random.default_rng(0)
    sizes = [(40, 30), (24, 36), (20, 20), (50, 21), (33, 33), (18, 25)]
    for k, (w, h) in enumerate(sizes):
        mode = "RGBA" if k == 2 else "RGB"
        arr = g.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"{k:03d}.png")
    det = ConvStandIn()
    ref = BenchReference(kind="folder", images=str(folder), resolution=16)
    stats = reference_statistics(det, ref, cache_dir=tmp_path / "cache")
    manual = []
    for k in range(len(sizes)):
        im = Image.open(folder / f"{k:03d}.png").convert("RGB")
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        im = im.crop(box)
        if s != 16:
            im = im.resize((16, 16), Image.LANCZOS)
        manual.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    want = stats_of(det, torch.stack(manual))
    assert stats.count == 6 and reference_count(ref) == 6
    assert torch.allclose(stats.mean(), want.mean(), atol=1e-6)
    assert torch.allclose(stats.cov(), want.cov(), atol=1e-6)
    assert stats.meta["resolution"] == 16 and stats.meta["extractor"] == "dd-test-conv"
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    again = reference_statistics(det, ref, cache_dir=tmp_path / "cache")
    assert torch.equal(again.sum, stats.sum) and again.count == 6
    ref4 = BenchReference(kind="folder", images=str(folder), resolution=16, max_images=4)
    assert reference_count(ref4) == 4
    assert reference_statistics(det, ref4, cache_dir=tmp_path / "cache").count == 4
    # precomputed statistics: used when they match, refused when computed differently
    path = stats.save(tmp_path / "given.npz")
    given = BenchReference(kind="folder", images=str(folder), resolution=16,
                           stats={"dd-test-conv": str(path)})
    assert torch.equal(reference_statistics(det, given).sum, stats.sum)
    with pytest.raises(ValueError, match="'resolution'"):
        reference_statistics(det, BenchReference(kind="folder", images=str(folder), resolution=32,
                                                 stats={"dd-test-conv": str(path)}))
    other = ConvStandIn("dd-test-conv-b", seed=1)
    with pytest.raises(ValueError, match="'extractor'"):
        reference_statistics(other, BenchReference(kind="folder", images=str(folder),
                                                   resolution=16, stats={other.name: str(path)}))


def test_fashion_mnist_reference_equals_test_split(tmp_path):
    det = ConvStandIn()
    ref = BenchReference(resolution=16, max_images=40)
    stats = reference_statistics(det, ref, cache_dir=tmp_path)
    want = stats_of(det, fashion_mnist_uint8("test", 16, limit=40))
    assert stats.count == 40 and reference_count(ref) == 40
    assert torch.allclose(stats.mean(), want.mean(), atol=1e-6)
    assert stats.meta["source"] == "fashion-mnist/test" and stats.meta["resolution"] == 16
    assert reference_count(BenchReference()) == 10000


def test_validation_reference_is_its_own_images_and_never_mixes_with_test(tmp_path):
    from diffdistill.eval.harness import _protocol, _quick_reference
    from diffdistill.eval.reference import FMNIST_VAL_SOURCE

    from diffdistill.config import EvalConfig
    from diffdistill.fmnist import VAL_RANGE, load_fashion_mnist

    # the validation images are training images 50000-59999, none of the test split's
    train, train_labels = load_fashion_mnist("train")
    val, val_labels = load_fashion_mnist("val")
    assert VAL_RANGE == (50000, 60000) and len(val) == 10000
    assert np.array_equal(val, train[50000:]) and np.array_equal(val_labels, train_labels[50000:])
    det = ConvStandIn()
    ref = BenchReference(kind="fashion_mnist_val", resolution=16, max_images=24)
    stats = reference_statistics(det, ref, cache_dir=tmp_path)
    want = stats_of(det, fashion_mnist_uint8("train", 16)[50000:50024])
    assert stats.count == 24 and reference_count(ref) == 24
    assert torch.allclose(stats.mean(), want.mean(), atol=1e-6)
    assert stats.meta["source"] == FMNIST_VAL_SOURCE == "fashion-mnist/train[50000:60000]"
    assert reference_count(BenchReference(kind="fashion_mnist_val")) == 10000
    # statistics of one kind given to a reference of the other are refused, both ways
    val_file = stats.save(tmp_path / "val.npz")
    test_file = reference_statistics(det, BenchReference(resolution=16, max_images=24)).save(
        tmp_path / "test.npz")
    with pytest.raises(ConfigError, match="never mix"):
        reference_statistics(det, BenchReference(resolution=16, stats={det.name: str(val_file)}))
    with pytest.raises(ConfigError, match="never mix"):
        reference_statistics(det, BenchReference(kind="fashion_mnist_val", resolution=16,
                                                 stats={det.name: str(test_file)}))
    assert reference_statistics(det, BenchReference(
        kind="fashion_mnist_val", resolution=16, stats={det.name: str(val_file)})).count == 24
    # a training run's periodic metric (which picks checkpoints) is measured on validation
    assert EvalConfig().reference == "fashion_mnist_val"
    assert _quick_reference("fashion_mnist_val", det.name, 16).kind == "fashion_mnist_val"
    # the bench's result says which reference it used
    from diffdistill.eval.bench_config import BenchConfig
    from diffdistill.eval.prompts import build_eval_prompts

    cfg = BenchConfig(reference=BenchReference(kind="fashion_mnist_val"))
    proto = _protocol(cfg, build_eval_prompts(cfg), 10000, [det], None)
    assert proto["reference_kind"] == "fashion_mnist_val"
    assert proto["reference"].startswith("Fashion-MNIST validation images")


@pytest.mark.world_assets
def test_shipped_validation_statistics_are_the_validation_images():
    from diffdistill.eval.features import get_detector
    from diffdistill.eval.reference import FMNIST_VAL_SOURCE

    from diffdistill.world import load_ref_stats

    shipped = load_ref_stats("fmnist-net", split="val", source=FMNIST_VAL_SOURCE,
                             resolution=32, extractor="fmnist-net")
    det = get_detector("fmnist-net", device="cpu")
    recomputed = FeatureStats.for_detector(det, resolution=32)
    images = fashion_mnist_uint8("val", 32)
    for i in range(0, len(images), 500):
        recomputed.update(det(images[i:i + 500]))
    assert shipped.count == recomputed.count == 10000
    assert fid_from_stats(shipped, recomputed) < 1e-6
    test = load_ref_stats("fmnist-net", source="fashion-mnist/test")
    assert fid_from_stats(shipped, test) > 1e-3  # another set of images


# ----------------------------------------------------------------------------- 2 processes


def test_two_process_bench_equals_one_process(pixel_dir, tmp_path):
    """accelerate launch, 2 CPU ranks: every seed generated exactly once, and the same images
    and Fréchet distances as one process."""
    from diffdistill.eval.bench_config import load_bench_config
    from diffdistill.eval.harness import run_bench
    from diffdistill.eval.report import load_results

    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text(
        f"models:\n  - {{name: pix, path: {pixel_dir}, sampler: ddim, steps: [2], "
        "guidance_scale: 1.5}\n"
        "num_samples: 16\nbatch_size: 4\ngrid_samples: 6\nwarmup: false\nprogress: false\n"
        "reference: {kind: fashion_mnist_test, resolution: 16, max_images: 32}\n"
        "detectors: [dd-test-conv, dd-test-conv-b]\n"
        "imports: [standins]\ndevice: cpu\n")
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    accel = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accel), "launch", "--config_file",
                        str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                        str(free_port()), "-m", "diffdistill.cli", "bench", str(cfg_file),
                        f"out={two}", f"cache_dir={tmp_path / 'cache2'}"],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    run_bench(load_bench_config(cfg_file, [f"out={one}", f"cache_dir={tmp_path / 'cache1'}"]))
    a, b = load_results(one / "results.json"), load_results(two / "results.json")
    assert a.machine["num_processes"] == 1 and b.machine["num_processes"] == 2
    (ra,), (rb,) = a.rows, b.rows
    assert ra.seed_ranges_by_rank == [[[0, 16]]]
    assert len(rb.seed_ranges_by_rank) == 2 and all(rb.seed_ranges_by_rank)
    seeds = [s for ranges in rb.seed_ranges_by_rank for lo, hi in ranges for s in range(lo, hi)]
    assert sorted(seeds) == list(range(16)) and len(set(seeds)) == 16
    assert rb.num_samples == 16
    # default CLIP judge (the world's), precision / recall on the first detector's features
    # (gathered across ranks in sample order), class agreement from the world classifier
    assert set(ra.metrics) == {"FD-dd-test-conv", "FID-TEST", "CLIP score", "precision",
                               "recall", "class agreement"}
    assert "world-clip-judge" not in a.protocol["clip_score"]  # named by its model
    assert "fmnist-clip-judge" in a.protocol["clip_score"]
    for k, v in ra.metrics.items():
        assert v is not None and rb.metrics[k] == pytest.approx(v, rel=1e-6), k
    assert ra.metrics["FD-dd-test-conv"] > 0 and ra.metrics["FID-TEST"] > 0
    # the grid (first 6 seeds, 3 from each rank) is pixel-identical
    ga, gb = Image.open(one / "grid.png"), Image.open(two / "grid.png")
    assert np.array_equal(np.asarray(ga), np.asarray(gb))
    # the reference caches (2 statistics, 1 feature set) were written once, by rank 0
    assert len(list((tmp_path / "cache2").glob("*.npz"))) == 3


# ----------------------------------------------------------------------------- trainer


def _eval_pretrain_class():
    """The pretraining trainer with its student as the periodic evaluation's model."""
    from diffdistill.trainers.pretrain import PretrainTrainer

    class EvalPretrain(PretrainTrainer):
        def eval_spec(self):
            bb = self.backbone
            return EvalModel("student", bb, bb.denoiser(self.generator_unet()), "ddim",
                             guidance_scale=self.cfg.eval.guidance_scale)

    return EvalPretrain


def _pretrain_cfg(pixel_dir, out, eval_section: dict, max_steps: int):
    from diffdistill.trainers.pretrain import PretrainConfig

    return build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(out), "seed": 1,
        "model": {"path": str(pixel_dir)},
        "data": {"kind": "fashion_mnist", "resolution": 16, "limit": 32},
        "train": {"max_steps": max_steps, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 0,
                  "cpu": True},
        "eval": eval_section,
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })


def test_trainer_periodic_eval_logs_the_harness_metric(pixel_dir, tmp_path):
    from diffdistill.eval.harness import quick_eval
    from diffdistill.trainers.pretrain import PretrainTrainer

    EvalPretrain = _eval_pretrain_class()
    det = ConvStandIn()
    ref_stats = reference_statistics(det, BenchReference(resolution=16, max_images=32))
    ref_file = ref_stats.save(tmp_path / "ref16.npz")

    def cfg(out, cls_eval):
        return _pretrain_cfg(pixel_dir, out, cls_eval, max_steps=2)

    ev = {"every": 1, "num_samples": 8, "steps": [1, 2], "guidance_scale": 1.0,
          "detector": "dd-test-conv", "reference": str(ref_file)}
    trainer = EvalPretrain(cfg(tmp_path / "run", ev))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fd_dd_test_conv_1step" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(set(r) == {"step", "eval/fd_dd_test_conv_1step", "eval/fd_dd_test_conv_2step",
                          "train_wall_s"} for r in evals)
    assert 0 < evals[0]["train_wall_s"] < evals[1]["train_wall_s"]
    # the logged number is the harness's number for the weights at that step
    again = quick_eval(trainer, trainer.eval_spec())
    assert again["eval/fd_dd_test_conv_2step"] == pytest.approx(
        evals[1]["eval/fd_dd_test_conv_2step"], rel=1e-9)
    assert evals[0]["eval/fd_dd_test_conv_2step"] != evals[1]["eval/fd_dd_test_conv_2step"]
    assert all(v > 0 for r in evals for k, v in r.items() if k.startswith("eval/"))
    # reference statistics of another resolution are refused
    trainer._quick_eval_cache.clear()
    bad = reference_statistics(det, BenchReference(resolution=32, max_images=8)).save(
        tmp_path / "ref32.npz")
    trainer.cfg.eval.reference = str(bad)
    with pytest.raises(ValueError, match="'resolution'"):
        quick_eval(trainer, trainer.eval_spec())
    # a reference smaller than eval.num_samples is an error naming the way out
    trainer._quick_eval_cache.clear()
    trainer.cfg.eval.reference = str(reference_statistics(
        det, BenchReference(resolution=16, max_images=4)).save(tmp_path / "ref4.npz"))
    with pytest.raises(ConfigError, match="eval.num_samples"):
        quick_eval(trainer, trainer.eval_spec())
    # a trainer whose eval_spec is None (the base Trainer's default): nothing logged
    class NoEval(PretrainTrainer):
        def eval_spec(self):
            return None

    plain = NoEval(cfg(tmp_path / "plain", ev))
    plain.fit()
    text = (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert "eval/" not in text and plain.periodic_eval() == {}


def test_a_bench_entry_without_steps_runs_what_the_export_serves():
    from diffdistill.eval.eval_model import recorded_step_counts

    assert recorded_step_counts({"steps": 4, "served_steps": [1, 2, 4, 8]}) == [1, 2, 4, 8]
    assert recorded_step_counts({"steps": 2}) == [2]
    assert recorded_step_counts({}) == [4]


def test_periodic_precision_recall_against_the_validation_images(pixel_dir, tmp_path):
    """eval.precision_recall: precision / recall of the eval samples against the first
    num_samples validation images, equal to the metric recomputed from the features."""
    from diffdistill.eval.harness import quick_eval
    from diffdistill.eval.precision_recall import precision_recall

    EvalPretrain = _eval_pretrain_class()

    def cfg(out, ev):
        return _pretrain_cfg(pixel_dir, out, ev, max_steps=1)

    ev = {"every": 1, "num_samples": 12, "steps": [2], "detector": "dd-test-conv",
          "reference": "fashion_mnist_val", "precision_recall": True}
    tr = EvalPretrain(cfg(tmp_path / "run", ev))
    tr.fit()
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if "eval/recall_2step" in x][-1]
    det = ConvStandIn()
    real = det(fashion_mnist_uint8("val", 16, limit=12)).float()
    gen = generate_for_eval(tr.eval_spec(), list(range(12)), num_steps=2, detectors=[det],
                            resolution=16, keep_features=[det.name])
    want = precision_recall(real, gen.features[det.name])
    assert row["eval/precision_2step"] == pytest.approx(want.precision, abs=1e-12)
    assert row["eval/recall_2step"] == pytest.approx(want.recall, abs=1e-12)
    assert quick_eval(tr, tr.eval_spec())["eval/recall_2step"] == pytest.approx(want.recall)
    with pytest.raises(ConfigError, match="precision_recall needs reference images"):
        cfg(tmp_path / "bad", {**ev, "reference": str(tmp_path / "stats.npz")})
