"""``diffdistill bench``: the command end to end on tiny models (a teacher and a base + LoRA
student), the report files (results.json round trip, markdown rows, grid tiles, plot), the
shipped bench configs run on the tiny fixtures, and configuration errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffdistill.eval.bench_config import BenchClip, BenchReference, load_bench_config
from diffdistill.eval.clip_score import clip_score
from diffdistill.eval.eval_model import EvalModel
from diffdistill.eval.generation import generate_for_eval
from diffdistill.eval.harness import run_bench
from diffdistill.eval.prompts import read_captions
from diffdistill.eval.report import (
    BenchResults,
    BenchRow,
    load_results,
    markdown_table,
    save_grid_rows,
)
from PIL import Image
from standins import tiny_clip  # also registers the stand-in detectors

from diffdistill.adapters import make_trainable
from diffdistill.backbone import load_backbone
from diffdistill.cli import main
from diffdistill.config import ConfigError
from diffdistill.export import EXPORT_INFO, save_lora
from diffdistill.fmnist import caption_for_class

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_dir(sd_dir, tmp_path_factory):
    """A diffusers-format LoRA for the tiny SD UNet with non-zero (seeded) up weights."""
    bb = load_backbone(str(sd_dir))
    make_trainable(bb.unet, adapter="lora", rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bb.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("lora")
    save_lora(bb.unet, out, kind="sd")
    return out


def _tiles(path, rows, cols, size, pad=2, labelled=True):
    """The grid's tiles; a labelled grid (the bench's) has a label margin on its left."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    width = cols * (size + pad) + pad
    left = grid.shape[1] - width
    assert grid.shape[0] == rows * (size + pad) + pad and grid.shape[2] == 3
    assert (left > 0) if labelled else (left == 0)
    return [[grid[pad + r * (size + pad):pad + r * (size + pad) + size,
                  left + pad + c * (size + pad):left + pad + c * (size + pad) + size]
             for c in range(cols)] for r in range(rows)]


def test_bench_command_end_to_end(sd_dir, lora_dir, tmp_path, capfd):
    # The reference folder holds the teacher's own samples (seeds 0..7, classes i % 10, CFG 2,
    # 2 DDIM steps): the teacher row at 2 steps must score a Fréchet distance of 0.
    bb = load_backbone(str(sd_dir))
    teacher = EvalModel("t", bb, bb.denoiser(), "ddim", guidance_scale=2.0)
    own = generate_for_eval(teacher, range(8), num_steps=2, batch_size=4, grid_samples=8).grid
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(own):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(ref / f"{i:03d}.png")
    # a LoRA export that records its sampler, steps, guidance and timesteps (as trainers do)
    recorded = tmp_path / "recorded"
    shutil.copytree(lora_dir, recorded)
    (recorded / EXPORT_INFO).write_text(json.dumps(
        {"sampler": "lcm", "steps": 2, "guidance_scale": 1.0, "timesteps": [999, 599]}))
    out = tmp_path / "bench"
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"""models:
  - {{name: teacher, path: {sd_dir}, sampler: ddim, steps: [2, 3], guidance_scale: 2.0}}
  - {{name: student, path: {sd_dir}, lora: {lora_dir}, sampler: lcm, steps: [1, 2]}}
  - {{name: recorded, path: {sd_dir}, lora: {recorded}}}
num_samples: 8
batch_size: 4
grid_samples: 4
reference: {{images: {ref}, resolution: 32}}
detectors: [dd-test-conv, dd-test-conv-b]
clip: {{detector: dd-test-clip}}
imports: [standins]
out: /nonexistent/overridden
""")
    assert main(["bench", str(cfg), f"out={out}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    err = capfd.readouterr().err
    assert "teacher @ 2 steps" in err and "generate" in err and "features" in err  # progress

    data = json.loads((out / "results.json").read_text())
    res = load_results(out / "results.json")
    assert BenchResults.from_dict(data).to_dict() == data  # round trip
    assert [(r.model, r.steps) for r in res.rows] == [("teacher", 2), ("teacher", 3),
                                                      ("student", 1), ("student", 2),
                                                      ("recorded", 2)]
    assert res.metrics == ["FD-dd-test-conv", "FID-TEST", "CLIP score", "precision", "recall"]
    t2, t3, s1, s2, rec = res.rows
    for metric in ("FD-dd-test-conv", "FID-TEST"):
        assert abs(t2.metrics[metric]) < 1e-6  # against its own samples
        assert all(r.metrics[metric] > 1e-3 for r in (t3, s1, s2, rec))
    # precision / recall on the first detector's features: its own samples cover each other
    assert t2.metrics["precision"] == t2.metrics["recall"] == 1.0
    assert all(0 <= r.metrics[m] <= 1 for r in res.rows for m in ("precision", "recall"))
    assert "k = 3" in res.protocol["precision_recall"]
    assert "class agreement" not in res.metrics  # a folder reference: no world classes
    # sampler, steps and timesteps come from the export's record
    assert (rec.sampler, rec.guidance_scale, rec.timesteps) == ("lcm", 1.0, [999.0, 599.0])
    assert s2.timesteps == [999.0, 499.0] and rec.metrics != s2.metrics
    captions = [caption_for_class(i % 10, 0) for i in range(8)]
    assert t2.metrics["CLIP score"] == pytest.approx(clip_score(tiny_clip(), own, captions).mean,
                                                     abs=1e-6)
    assert [r.sampler for r in res.rows] == ["ddim", "ddim", "lcm", "lcm", "lcm"]
    assert t2.timesteps == [501.0, 1.0]
    assert all(r.num_samples == 8 and r.sec_per_image > 0 and r.peak_memory_mb >= 0
               and r.peak_memory_kind == "cpu_peak_rss_delta"
               and r.seed_ranges_by_rank == [[[0, 8]]] for r in res.rows)
    assert s1.lora == str(lora_dir) and res.grid_seeds == [0, 1, 2, 3]
    assert data["grid_rows"] == ["teacher @ 2", "teacher @ 3", "student @ 1", "student @ 2",
                                 "recorded @ 2"]
    assert res.protocol["num_samples"] == 8 and res.protocol["evaluation_resolution"] == 32
    assert "mean cosine" in res.protocol["clip_score"]
    assert res.machine["cpu"] and res.machine["torch"] == torch.__version__
    assert res.command.startswith("diffdistill bench") and res.date[:2] == "20"

    # markdown: exactly the configured rows, in order, with every metric column
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == ("| model | steps | sampler | guidance | FD-dd-test-conv | FID-TEST | "
                        "CLIP score | precision | recall | s/img | peak mem (MB) |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert [(c[0], c[1], c[3]) for c in cells] == [("teacher", "2", "2"), ("teacher", "3", "2"),
                                                   ("student", "1", "1"), ("student", "2", "1"),
                                                   ("recorded", "2", "1")]
    assert float(cells[1][4]) == pytest.approx(t3.metrics["FD-dd-test-conv"], abs=1e-4)
    assert "N = 8 samples" in md and "centre-cropped and LANCZOS" in md

    # report.html: self-contained, every results row on it, grid and plot embedded
    from helpers import check_report_html

    page = check_report_html(out / "report.html", out / "results.json")
    assert page["images"] == ["sample grid", "metrics vs steps"]
    # grid: rows = models x steps, columns = the same 4 seeds
    tiles = _tiles(out / "grid.png", rows=5, cols=4, size=32)
    for c in range(4):
        assert np.array_equal(tiles[0][c], own[c].permute(1, 2, 0).numpy())
    # the LoRA row is what `diffdistill sample BASE --lora` draws for the same seed and prompt
    diffs = []
    for lora in (lora_dir, None):
        png = tmp_path / f"sample-{lora is not None}.png"
        args = ["sample", str(sd_dir), "--prompt", caption_for_class(0, 0), "--steps", "1",
                "--sampler", "lcm", "--num", "1", "--seed", "0", "--out", str(png)]
        assert main(args + (["--lora", str(lora)] if lora else [])) == 0
        single = np.asarray(Image.open(png).convert("RGB"))[2:34, 2:34]
        diffs.append(np.abs(tiles[2][0].astype(int) - single.astype(int)).max())
    assert diffs[0] <= 1  # the LoRA row: batch of 4 vs batch of 1, rounding at most
    assert diffs[1] > 8  # without the LoRA: clearly other images
    plot = Image.open(out / "fid_vs_steps.png")
    assert plot.format == "PNG" and plot.size == (840, 340)  # one panel per Fréchet distance


def test_shipped_bench_configs_run_on_tiny_models(sd_dir, lora_dir, tmp_path):
    coco = tmp_path / "coco"
    (coco / "val").mkdir(parents=True)
    g = np.random.default_rng(0)
    for k in range(5):
        arr = g.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(coco / "val" / f"COCO_val2014_{k:012d}.jpg")
    anns = {"images": [{"id": k, "file_name": f"COCO_val2014_{k:012d}.jpg"} for k in range(5)],
            "annotations": [{"id": 10 * k + j, "image_id": k, "caption": f"image {k} caption {j}"}
                            for k in reversed(range(5)) for j in range(2)]}
    (coco / "captions.json").write_text(json.dumps(anns))
    for name in ("world.yaml", "coco_sd15.yaml"):
        cfg = load_bench_config(ROOT / "configs" / "bench" / name,
                                [f"out={tmp_path / name}", "num_samples=4", "batch_size=4",
                                 "grid_samples=2", "dtype=fp32", "warmup=false",
                                 "progress=false", "detectors=[dd-test-conv]", "device=cpu"])
        for m in cfg.models:  # the tiny SD-structured pipeline stands in for every model
            m.path, m.steps, m.timesteps = str(sd_dir), m.steps[:1], None
            if m.lora:
                m.lora = str(lora_dir)
        cfg.clip = BenchClip(detector="dd-test-clip")
        cfg.detector_options = {}
        cfg.imports = ["standins"]
        if cfg.reference.kind == "folder":
            assert cfg.reference.resolution == 256 and cfg.num_samples == 4
            cfg.reference.images = str(coco / "val")
            cfg.reference.captions = str(coco / "captions.json")
        else:
            cfg.reference = BenchReference(max_images=3, allow_fewer=True)
        cfg.validate()
        res = run_bench(cfg)
        assert [(r.model, r.steps) for r in res.rows] == [(m.name, m.steps[0]) for m in cfg.models]
        assert all(r.metrics["FD-dd-test-conv"] > 0 and r.metrics["CLIP score"] is not None
                   for r in res.rows)
        world = name == "world.yaml"  # world classes: the Fashion-MNIST net's class agreement
        assert ("class agreement" in res.metrics) == world
        if world:
            assert all(r.metrics["class agreement"] in (0, .25, .5, .75, 1) for r in res.rows)
            # 3 reference images (allow_fewer) cannot have 3 nearest neighbours: n/a
            assert res.rows[0].metrics["precision"] is None
        size = 256 if name == "coco_sd15.yaml" else 32
        _tiles(tmp_path / name / "grid.png", rows=len(cfg.models), cols=2, size=size)
        if name == "coco_sd15.yaml":
            assert "first 4" in res.protocol["prompts"] and res.protocol["reference_count"] == 5
    assert read_captions(coco / "captions.json") == [f"image {k} caption 0" for k in range(5)]


def test_read_captions_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "b.jsonl").write_text('{"caption": "x"}\n"y"\n{"text": "z"}\n')
    (tmp_path / "c.json").write_text('["p", {"prompt": "q"}]')
    assert read_captions(tmp_path / "a.txt") == ["a cat", "a dog"]
    assert read_captions(tmp_path / "b.jsonl") == ["x", "y", "z"]
    assert read_captions(tmp_path / "c.json") == ["p", "q"]
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "missing.txt")


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "b.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("models: [{name: a, path: x, stepz: [1]}]", r"models\[0\]\.stepz"),
    ("models: [{name: a, path: x, steps: [2], timesteps: [999, 500, 1]}]", r"models\[0\]\.timesteps"),
    ("models: [{name: a, path: x}, {name: a, path: y}]", r"models\[1\]\.name"),
    ("models: [{name: a, path: x, steps: []}]", r"models\[0\]\.steps"),
    ("models: [{name: a, path: x, timesteps: [999]}]", r"models\[0\]\.timesteps needs"),
    ("models: []", "models"),
    ("models: [{name: a, path: x}]\nclip: {detector: c, model: ViT-B-32}", "clip"),
    ("models: [{name: a, path: x}]\ndevice: cpu\ndtype: fp16", "dtype"),
    ("models: [{name: a, path: x}]\nprompts: {kind: captions}", "prompts.kind"),
    ("models: [{name: a, path: x}]\nreference: {kind: folder}", "reference.images"),
    ("models: [{name: a, path: x}]\nnum_samples: 1", "num_samples"),
    ("models: [{name: a, path: x}]\nreference: imagenet", "reference.kind"),
])
def test_bench_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_bench_config(_write(tmp_path, text))


def test_bench_config_shorthands_and_early_errors(tmp_path, capsys):
    cfg = load_bench_config(_write(tmp_path, "models: [{name: a, path: x}]\n"
                                             "reference: fashion_mnist_test"))
    assert cfg.reference.kind == "fashion_mnist_test" and cfg.detectors == ["fmnist-net",
                                                                              "effnet-lite0"]
    cfg = load_bench_config(_write(tmp_path, "models: [{name: a, path: x}]\n"),
                            [f"reference.images={tmp_path}", "reference.resolution=64"])
    assert cfg.reference.kind == "folder" and cfg.reference.resolution == 64
    # fewer reference images than samples: refused before any model loads
    path = _write(tmp_path, "models: [{name: a, path: /does/not/exist}]\nnum_samples: 20\n"
                            "reference: {kind: fashion_mnist_test, max_images: 10}\n"
                            f"detectors: [dd-test-conv]\nimports: [standins]\n"
                            f"out: {tmp_path / 'o'}\n")
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert "10 images but num_samples=20" in err and "reference.allow_fewer=true" in err
    # fewer captions than samples
    (tmp_path / "caps.txt").write_text("a\nb\n")
    assert main(["bench", str(path), "reference.max_images=null",
                 f"prompts.file={tmp_path / 'caps.txt'}"]) == 2
    assert "holds 2 captions but num_samples=20" in capsys.readouterr().err


def _row(model, steps, fd, clip=None):
    return BenchRow(model=model, steps=steps, sampler="lcm", guidance_scale=1.0,
                    timesteps=[999.0], num_samples=4, metrics={"FID": fd, "CLIP score": clip},
                    sec_per_image=0.5, peak_memory_mb=12.0, peak_memory_kind="cuda_max_allocated")


def test_report_table_grid_and_plot(tmp_path):
    from diffdistill.eval.report import write_report

    res = BenchResults(rows=[_row("a", 1, 12.5, 0.31), _row("a", 4, 8.25, None),
                             _row("b", 1, 20.0, 0.29)],
                       metrics=["FID", "CLIP score"], protocol={"num_samples": 4},
                       machine={"cpu": "x"}, command="diffdistill bench x.yaml")
    md = markdown_table(res)
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows == ["| a | 1 | lcm | 1 | 12.5000 | 0.3100 | 0.5000 | 12.0 |",
                    "| a | 4 | lcm | 1 | 8.2500 | n/a | 0.5000 | 12.0 |",
                    "| b | 1 | lcm | 1 | 20.0000 | 0.2900 | 0.5000 | 12.0 |"]
    img = torch.randint(0, 256, (3, 2, 3, 10, 10), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    paths = write_report(res, list(img), tmp_path)
    tiles = _tiles(paths["grid"], rows=3, cols=2, size=10)
    assert np.array_equal(tiles[2][1], img[2, 1].permute(1, 2, 0).numpy())
    label_margin = np.asarray(Image.open(paths["grid"]).convert("RGB"))[:, :20]
    assert label_margin.max() > 128  # "a @ 1" … written beside the rows
    assert Image.open(paths["plot"]).size == (420, 340)  # one panel: FID (CLIP is not a distance)
    assert load_results(paths["json"]).to_dict() == json.loads(paths["json"].read_text())
    with pytest.raises(ValueError, match="grid rows differ"):
        save_grid_rows([img[0], img[1, :1]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels"):
        save_grid_rows([img[0]], tmp_path / "bad.png", labels=["a", "b"])
    small = img[1, :, :, :5, :5].contiguous()  # a 5 px model next to a 10 px one
    tiles = _tiles(save_grid_rows([img[0], small], tmp_path / "mixed.png"), 2, 2, size=10,
                   labelled=False)
    assert np.array_equal(tiles[1][0], np.asarray(Image.fromarray(
        small[0].permute(1, 2, 0).numpy()).resize((10, 10), Image.LANCZOS)))


@pytest.mark.parametrize("name", ["world", "world_teachers", "world_teacher_pixel",
                                  "world_teacher_flow",
                                  "world_ict_scratch", "world_fdistill", "world_reward_clip",
                                  "world_one_step", "world_hypersd_seeds", "world_lcd_onestep_t",
                                  "coco_sd15"])
def test_shipped_bench_configs_validate(name):
    from pathlib import Path

    from diffdistill.eval.bench_config import load_bench_config

    path = Path(__file__).resolve().parents[1] / "configs" / "bench" / f"{name}.yaml"
    cfg = load_bench_config(path)
    assert cfg.models and all(m.path for m in cfg.models)
    if name.startswith("world"):
        expected = {  # name -> (num_samples, detectors); 1000: the demo's protocol
            "world": (10000, ["fmnist-net", "effnet-lite0"]),
            "world_teachers": (10000, ["fmnist-net"]),
            "world_one_step": (10000, ["fmnist-net"]),
            "world_hypersd_seeds": (10000, ["fmnist-net"]),
            "world_fdistill": (10000, ["fmnist-net"]),
        }.get(name, (1000, ["fmnist-net"]))
        assert (cfg.num_samples, cfg.detectors) == expected
        assert cfg.reference.kind == "fashion_mnist_test"
        # CLIP is scored by the independent judge, except where the reward is the point
        judge = "world-clip" if name == "world_reward_clip" else "world-clip-judge"
        assert cfg.clip.detector == judge


def test_a_row_judged_by_its_own_reward_network_is_marked(sd_dir, lora_dir, tmp_path):
    """The CLIP judge is a weights file; the student's export records that same file (by
    sha256, under another path) as its reward network: its CLIP cell says so, the others
    do not; also the default judge when no clip is configured."""
    from standins import TINY_CLIP, make_tiny_clip

    from diffdistill.fingerprint import weights_sha256

    cfg_file, weights, _ = make_tiny_clip(tmp_path)
    copy = tmp_path / "elsewhere" / "reward.safetensors"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    rewarded = tmp_path / "rewarded"
    shutil.copytree(lora_dir, rewarded)
    (rewarded / EXPORT_INFO).write_text(json.dumps(
        {"sampler": "lcm", "steps": 1, "guidance_scale": 1.0, "timesteps": [999],
         "reward_networks": [{"kind": "clip", "path": str(copy),
                              "sha256": weights_sha256(copy)}]}))
    cfg = load_bench_config(_write(tmp_path, f"""models:
  - {{name: teacher, path: {sd_dir}, sampler: ddim, steps: [1], guidance_scale: 2.0}}
  - {{name: rewarded, path: {sd_dir}, lora: {rewarded}}}
num_samples: 4
batch_size: 4
grid_samples: 0
reference: {{kind: fashion_mnist_test, max_images: 8}}
detectors: [dd-test-conv]
clip: {{model: {TINY_CLIP}, weights: {weights}, config: {cfg_file}}}
imports: [standins]
progress: false
warmup: false
out: {tmp_path / 'out'}
"""))
    res = run_bench(cfg)
    assert [r.judge_is_reward for r in res.rows] == [False, True]
    md = (tmp_path / "out" / "results.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in md.splitlines() if line.startswith("| ")]
    col = cells[0].index("CLIP score")
    assert "judge = reward" not in cells[1][col] and cells[2][col].endswith("(judge = reward)")
    assert "judge = reward: the model was trained against" in md
    assert cells[0][-3:] == ["class agreement", "s/img", "peak mem (MB)"]
    assert all(0 <= float(c[cells[0].index("class agreement")]) <= 1 for c in cells[1:])
    # no clip section: on the world's reference the default CLIP score is the world's judge
    default = load_bench_config(_write(tmp_path, "models: [{name: a, path: x}]\n"
                                                 "reference: fashion_mnist_test"))
    assert default.clip == BenchClip(detector="auto")
    from diffdistill.eval.harness import WORLD_JUDGE, _build_clip

    judge = _build_clip(default.clip, {}, "cpu", default.reference)
    assert WORLD_JUDGE == "world-clip-judge" and judge.model_name == "fmnist-clip-judge"
    assert _build_clip(default.clip, {}, "cpu", BenchReference(kind="folder")) is None
    assert load_bench_config(_write(tmp_path, "models: [{name: a, path: x}]\nclip: null"
                                    )).clip is None


def test_machine_info_records_the_checkout_commit():
    """Every results.json names the commit it was measured at (clean or +dirty)."""
    import re
    import subprocess

    from diffdistill.eval.report import machine_info

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    commit = machine_info()["commit"]
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", commit) and commit.startswith(head)
