"""``diffdistill demo`` end to end on the tiny-scale world (every method, smoke budgets)."""

import json
import os

import numpy as np
from PIL import Image

from diffdistill.world import WORLD_DIR_ENV


def test_hypersd_stages_scale_with_the_demo_budget():
    from diffdistill.app.demo import _hypersd_stage_override
    from diffdistill.config import packaged_config_dir, parse_overrides

    stages = parse_overrides([_hypersd_stage_override(
        packaged_config_dir() / "hypersd/toy.yaml", 500)])
    steps = [st.get("steps") for st in stages["hypersd"]["stages"]]
    assert steps == [100, 100, 100, 100, None]  # 500 of 2500 steps: a fifth of each stage
    assert [st["segments"] for st in stages["hypersd"]["stages"]] == [8, 4, 2, 1, 1]


def test_demo_refuses_a_world_without_teachers(tmp_path, monkeypatch, capsys):
    from diffdistill.cli import main

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "world.json").write_text(json.dumps({"stages": {}}))
    monkeypatch.setenv(WORLD_DIR_ENV, str(tmp_path / "w"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "teacher_latent" in err and "diffdistill world build" in err


def test_demo_rejects_unknown_method(tiny_world, tmp_path, monkeypatch, capsys):
    from diffdistill.cli import main

    monkeypatch.setenv(WORLD_DIR_ENV, str(tiny_world[0]))
    assert main(["demo", "--methods", "lcd,dmd3", "--out", str(tmp_path)]) == 2
    assert "dmd3" in capsys.readouterr().err


def test_demo_every_method_at_smoke_scale(tiny_world, tmp_path, monkeypatch, capfd):
    from diffdistill.app.demo import MAIN_METHODS, METHODS, run_demo, train_method

    monkeypatch.setenv(WORLD_DIR_ENV, str(tiny_world[0]))
    out = tmp_path / "demo"
    res = run_demo(out=str(out), methods=list(MAIN_METHODS), train_steps=6, num_samples=8,
                   tiny=True, jobs=2, command="diffdistill demo --all --smoke")
    text = capfd.readouterr().out
    # the worker processes report progress under each method's label (the last step always)
    assert all(f"[{METHODS[k].label}] step 6/6" in text for k in MAIN_METHODS)
    # every method trained for its budget and exported
    assert list(res.trained) == list(MAIN_METHODS)
    for key in res.trained:
        lines = (out / "train" / key / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 6, key
        assert (out / "train" / key / "export" / "diffdistill_export.json").exists(), key
    assert res.trained["lcd-lora"]["lora"] and not res.trained["lcd"]["lora"]
    # --jobs 2: two worker processes, one thread each on this 2-core machine
    assert {t["threads"] for t in res.trained.values()} == {max(1, (os.cpu_count() or 1) // 2)}
    # a second invocation finds every run finished: it re-exports and keeps the training time
    again = train_method("ict", out, steps=6, tiny=True)
    timing = json.loads((out / "train" / "ict" / "demo_timing.json").read_text())
    assert again["wall_s"] == timing["wall_s"] < res.trained["ict"]["wall_s"] + 5
    # one bench row per model x steps: the three teachers (iCT distills the pixel one, the
    # flow methods the flow one, sampled with flow Euler) + students
    rows = res.bench.rows
    models = list(dict.fromkeys(r.model for r in rows))
    assert models[:3] == ["teacher (latent, DDIM)", "teacher (pixel, DDIM)",
                          "teacher (flow, flow Euler)"]
    assert models[3:] == [METHODS[k].label for k in MAIN_METHODS]
    fid = res.bench.metrics[0]
    assert fid == "FID-FMNIST" and all(np.isfinite(r.metrics[fid]) for r in rows)
    assert all(0 < r.sec_per_image and r.num_samples == 8 for r in rows)
    # the grid has a row per bench row, same 8 seeds per row, 32 px images (+2 px padding)
    grid = np.asarray(Image.open(res.paths["grid"]))
    assert grid.shape[0] == 2 + len(rows) * 34 and grid.shape[1] > 2 + 8 * 34  # + labels
    assert Image.open(res.paths["plot"]).format == "PNG"
    for name in ("teacher_latent", "teacher_pixel", "teacher_flow"):
        assert np.asarray(Image.open(res.paths[name])).std() > 0
    # convergence curves: every method's periodic evals (its eval_steps), one figure
    curves = json.loads(res.paths["convergence_json"].read_text())
    for key in MAIN_METHODS:
        m = METHODS[key]
        names = [m.label] if len(m.eval_steps) == 1 else [
            f"{m.label} ({s} step)" for s in m.eval_steps]
        for name in names:
            assert curves[name]["steps"] == [1, 2, 3, 4, 5, 6], name
            assert all(np.isfinite(curves[name]["values"])), name
            assert all(w > 0 for w in curves[name]["wall_s"]), name
    assert Image.open(res.paths["convergence_plot"]).format == "PNG"
    # one page with all of it: training table, bench table, grid, plots, convergence
    from helpers import check_report_html

    page = check_report_html(res.paths["report"], out / "bench" / "results.json")
    assert page["images"] == ["sample grid", "metrics vs steps", "convergence curves"]
    assert page["headings"][1] == "Training"
    # the results file holds the training table and the bench table
    md = res.paths["results"].read_text()
    for m in map(METHODS.get, MAIN_METHODS):
        assert f"| {m.label} | `configs/{m.config}` | 6 |" in md
    assert "FID-FMNIST" in md and "`diffdistill demo --all --smoke`" in md
    assert res.bench.command == "diffdistill demo --all --smoke (bench stage)"
    # the best student is the lowest-FID student row, and its load lines are printed
    students = [r for r in rows if not r.model.startswith("teacher")]
    best = min(students, key=lambda r: (r.metrics[fid], r.steps))
    assert f"Best student: {best.model} at {best.steps} step(s)" in text
    assert "from_pretrained" in text


def test_demo_ablations_change_one_thing_of_their_main_method():
    """Each ablation loads as its main method's demo config with exactly the stated change."""
    from diffdistill.trainers import load_run_config

    from diffdistill.app.demo import MAIN_METHODS, METHODS
    from diffdistill.config import packaged_config_dir

    assert MAIN_METHODS == ("lcd", "lcd-lora", "rglcd", "dmd2", "fdistill", "hypersd", "ict",
                            "dmd2-flow", "lcd-flow")

    def cfg(key):
        m = METHODS[key]
        return load_run_config(packaged_config_dir() / m.config, list(m.overrides))[1]

    base, pixel = cfg("dmd2"), cfg("dmd2-pixel")
    assert base.dmd2.timesteps == [599] and base.dmd2.gan_generator_weight > 0
    assert pixel.model.path == "world:teacher_pixel" and pixel.dmd2.gan_generator_weight > 0
    for key, ref, steps, gan in [("dmd2-nogan", base, [599], False),
                                 ("dmd2-t999", base, [999], True),
                                 ("dmd2-4step", base, [999, 749, 499, 249], True),
                                 ("dmd2-4step-nogan", base, [999, 749, 499, 249], False),
                                 ("dmd2-pixel-nogan", pixel, [799], False),
                                 ("dmd2-pixel-4step", pixel, [999, 749, 499, 249], True)]:
        c = cfg(key)
        assert c.dmd2.timesteps == steps, key
        assert (c.dmd2.gan_generator_weight > 0, c.dmd2.gan_discriminator_weight > 0) == (
            gan, gan), key
        assert c.model.path == ref.model.path and c.train.lr == ref.train.lr, key
        assert METHODS[key].bench_steps == (len(steps),) and METHODS[key].variant
    lrm = cfg("rglcd-lrm")
    assert lrm.rglcd.mode == "lrm" and cfg("rglcd").rglcd.mode != "lrm"
    assert cfg("ict").train.ema_decay == 0.99  # the demo's 400 steps: a shorter EMA
    fpix = cfg("fdistill-pixel")  # f-distill on the pixel teacher: DMD2-pixel's recipe + JS
    assert fpix.model.path == pixel.model.path and fpix.dmd2.timesteps == pixel.dmd2.timesteps
    assert fpix.fdistill.divergence == "js" and METHODS["fdistill-pixel"].variant
    assert METHODS["fdistill-pixel"].teacher == "teacher_pixel"


def test_no_teachers_benches_only_the_students():
    from diffdistill.app.demo import bench_models

    trained = {"dmd2-pixel": {"lora": False, "export": "runs/x/export"},
               "lcd-lora": {"lora": True, "export": "runs/y/export"}}
    world_teachers = {"teacher_pixel": {"sampler": "ddim", "best_guidance_scale": 3.0},
                      "teacher_latent": {"best_guidance_scale": 2.5}}
    both = bench_models(trained, world_teachers)
    assert [m["name"] for m in both] == ["teacher (pixel, DDIM)", "teacher (latent, DDIM)",
                                         "DMD2 (pixel)", "LCD-LoRA"]
    assert [(m["sampler"], m["guidance_scale"]) for m in both[:2]] == [("ddim", 3.0),
                                                                       ("ddim", 2.5)]
    flow = bench_models({"dmd2-flow": {"lora": False, "export": "runs/z/export"}},
                        {"teacher_flow": {"sampler": "flow_euler", "best_guidance_scale": 3.0}})
    assert flow[0] == {"name": "teacher (flow, flow Euler)", "path": "world:teacher_flow",
                       "sampler": "flow_euler", "steps": [1, 2, 4, 8, 25],
                       "guidance_scale": 3.0}
    students = bench_models(trained, {}, teachers=False)
    assert students == both[2:]
    assert students[1]["path"] == "world:teacher_latent" and students[1]["lora"] == "runs/y/export"


def test_make_demo_runs_the_demo_command():
    from pathlib import Path

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "diffdistill demo" in demo
    assert "demo-all:" in make and "diffdistill demo --all --jobs 2" in make
