"""``diffdistill demo`` (``make demo``): the main job end to end on the embedded world.

1. loads the embedded world (:mod:`diffdistill.world`): prints the teachers' table from
   ``world.json`` and writes a sample grid of each teacher;
2. distills the world's teacher with each selected method's toy config
   (``configs/<method>/toy*.yaml``) through the same trainers ``accelerate launch -m
   diffdistill.train`` runs, at a step budget sized for two CPU cores;
3. runs the evaluation harness (``diffdistill bench``) on the teacher and every student:
   FID-FMNIST, CLIP score (and FD-EffNetLite0 with ``--effnet``: slow on CPU), steps and
   seconds per image in one table, a grid
   with the same seeds and prompts in every row and a plot of FID vs sampling steps;
4. prints the diffusers lines that load the best student.

Everything is written under ``--out`` (default ``runs/demo``); ``results.md`` there is the
results table. Training resumes from its checkpoints, so a second run only
re-evaluates. ``--all`` runs every method; ``--methods a,b`` picks some.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class DemoMethod:
    label: str  # row name in the tables
    config: str  # toy config, relative to configs/
    train_steps: int  # demo budget (optimizer steps); see METHODS for the measured minutes
    bench_steps: tuple[int, ...]  # sampling step counts the student is evaluated at
    teacher: str = "teacher_latent"  # the world teacher it distills (its bench row)
    overrides: tuple[str, ...] = ()  # demo-only config overrides
    scale_stages: bool = False  # Hyper-SD: scale hypersd.stages[*].steps to the budget
    variant: bool = False  # an ablation of a main method: only by name, not in --all
    eval_steps: tuple[int, ...] = (1,)  # step counts of the convergence curves (eval.steps)


NO_GAN = ("dmd2.gan_generator_weight=0", "dmd2.gan_discriminator_weight=0")
#: DMD2's demo budget: 450 steps of batch 32 (90 generator updates) take about as long on one
#: core as LCD-LoRA's 400, the other method `make demo` trains beside it (docs/one_step.md).
DMD2_STEPS = 450
FOUR_STEPS = "dmd2.timesteps=[999,749,499,249]"  # DMD2's 4-step SD/SDXL grid

#: The methods, in the order the table lists them. Step budgets: what fits a few minutes of
#: one 2-core CPU (the toy configs' own max_steps are the longer runs).
METHODS: dict[str, DemoMethod] = {
    "lcd": DemoMethod("LCD", "lcd/toy.yaml", 400, (1, 2, 4, 8), eval_steps=(1, 4)),
    "lcd-lora": DemoMethod("LCD-LoRA", "lcd/toy_lora.yaml", 400, (1, 2, 4, 8),
                           eval_steps=(1, 4)),
    "rglcd": DemoMethod("RG-LCD", "rglcd/toy.yaml", 400, (1, 2, 4, 8), eval_steps=(1, 4)),
    "dmd2": DemoMethod("DMD2", "dmd2/toy.yaml", DMD2_STEPS, (1,)),
    "fdistill": DemoMethod("f-distill (JS)", "fdistill/toy.yaml", DMD2_STEPS, (1,)),
    "hypersd": DemoMethod("Hyper-SD", "hypersd/toy.yaml", 500, (1, 2, 4, 8),
                          scale_stages=True, eval_steps=(1, 4)),
    # EMA 0.99 at this budget: the config's 0.999 (no warm-up) still holds ~2/3 of the initial
    # weights after 400 steps — 79.98 vs 36.43 one-step FID-FMNIST at step 320 (2026-12-03)
    "ict": DemoMethod("iCT", "ict/toy.yaml", 400, (1, 2), teacher="teacher_pixel",
                      overrides=("train.ema_decay=0.99",)),
    # the rectified-flow teacher (SD3 structure): DMD2 one step, LCD along the flow ODE
    "dmd2-flow": DemoMethod("DMD2 (flow)", "dmd2/toy_flow.yaml", DMD2_STEPS, (1,),
                            teacher="teacher_flow"),
    "lcd-flow": DemoMethod("LCD (flow)", "lcd/toy_flow.yaml", 400, (1, 2, 4, 8),
                           teacher="teacher_flow", eval_steps=(1, 4)),
    # Ablations (`--methods NAME`; not part of --all), each the main method's demo budget
    # with one thing changed.
    "dmd2-t999": DemoMethod("DMD2 (t = 999)", "dmd2/toy.yaml", DMD2_STEPS, (1,),
                            overrides=("dmd2.timesteps=[999]",), variant=True),
    "dmd2-nogan": DemoMethod("DMD2 (no GAN)", "dmd2/toy.yaml", DMD2_STEPS, (1,),
                             overrides=NO_GAN, variant=True),
    "dmd2-4step": DemoMethod("DMD2 4-step", "dmd2/toy.yaml", DMD2_STEPS, (4,),
                             overrides=(FOUR_STEPS,), variant=True, eval_steps=(4,)),
    "dmd2-4step-nogan": DemoMethod("DMD2 4-step (no GAN)", "dmd2/toy.yaml", DMD2_STEPS, (4,),
                                   overrides=(FOUR_STEPS, *NO_GAN), variant=True,
                                   eval_steps=(4,)),
    "dmd2-pixel": DemoMethod("DMD2 (pixel)", "dmd2/toy_pixel.yaml", DMD2_STEPS, (1,),
                             teacher="teacher_pixel", variant=True),
    "dmd2-pixel-nogan": DemoMethod("DMD2 (pixel, no GAN)", "dmd2/toy_pixel.yaml", DMD2_STEPS, (1,),
                                   teacher="teacher_pixel", overrides=NO_GAN, variant=True),
    "dmd2-pixel-4step": DemoMethod("DMD2 4-step (pixel)", "dmd2/toy_pixel.yaml", DMD2_STEPS, (4,),
                                   teacher="teacher_pixel", overrides=(FOUR_STEPS,),
                                   variant=True, eval_steps=(4,)),
    "fdistill-pixel": DemoMethod("f-distill (pixel, JS)", "fdistill/toy_pixel.yaml", DMD2_STEPS,
                                 (1,), teacher="teacher_pixel", variant=True),
    "rglcd-lrm": DemoMethod("RG-LCD (LRM)", "rglcd/toy_lrm.yaml", 400, (1, 2, 4, 8),
                            variant=True),
    # experimental, no improvement over the teacher measured yet: by name only
    "scm": DemoMethod("sCD", "scm/toy.yaml", 200, (1, 2), teacher="teacher_pixel",
                      variant=True, eval_steps=(1, 2)),
    "rcm": DemoMethod("rCM", "rcm/toy.yaml", 200, (1, 2), variant=True, eval_steps=(1, 2)),
}
#: ``--all``: the main methods (the seven on the VP teachers, two on the flow teacher).
MAIN_METHODS = tuple(k for k, m in METHODS.items() if not m.variant)
#: ``make demo``: one consistency student (multi-step) and one distribution-matching student
#: (one step) — the two families of the toolkit, in the time budget of a first look.
DEFAULT_METHODS = ("lcd-lora", "dmd2")
TEACHER_STEPS = (1, 2, 4, 8, 25)
SAMPLER_LABELS = {"ddim": "DDIM", "flow_euler": "flow Euler"}

# Smoke scale (--smoke, tests): every path runs, nothing is measured.
SMOKE_STEPS = 6
TINY_OVERRIDES = ("train.batch_size=4", "data.limit=64", "log.every=1", "eval.num_samples=8")
#: Periodic evaluations per training run: the points of the convergence curves.
EVAL_POINTS = 5
EVAL_SAMPLES = 1000


@dataclass
class DemoResult:
    out: Path
    trained: dict = field(default_factory=dict)  # key -> {steps, wall_s, export}
    bench: Optional[object] = None  # BenchResults
    paths: dict = field(default_factory=dict)


def _hypersd_stage_override(config: Path, steps: int) -> str:
    """``hypersd.stages=[...]`` with every fixed stage length scaled by steps / max_steps."""
    from diffdistill.config import deep_merge, load_yaml

    data = load_yaml(config)
    total = int(data["train"]["max_steps"])
    stages = deep_merge({}, data)["hypersd"]["stages"]
    for st in stages:
        if st.get("steps") is not None:
            st["steps"] = max(1, math.floor(st["steps"] * steps / total))
    return "hypersd.stages=" + json.dumps(stages)


def train_method(key: str, out: Path, *, steps: Optional[int] = None, tiny: bool = False,
                 overrides: Sequence[str] = ()) -> dict:
    """Train one method's toy config under ``out/train/<key>`` (resuming) and export it;
    ``overrides``: further dotted config overrides (applied last)."""
    from diffdistill.trainers import load_run_config

    m = METHODS[key]
    steps = int(steps or m.train_steps)
    from diffdistill.config import packaged_config_dir

    config = packaged_config_dir() / m.config
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: reinstall diffdistill (the demo reads "
                                "its packaged configs)")
    run_dir = out / "train" / key
    run_overrides = [f"output_dir={run_dir}", f"train.max_steps={steps}",
                 f"train.checkpoint_every={max(1, steps // 2)}", "train.keep_checkpoints=1",
                 "log.grid_every=0", "log.tensorboard=false",
                 f"eval.every={max(1, steps // EVAL_POINTS)}", f"eval.num_samples={EVAL_SAMPLES}",
                 f"eval.steps={list(m.eval_steps)}", *m.overrides]
    if m.scale_stages:
        run_overrides.append(_hypersd_stage_override(config, steps))
    if tiny:
        run_overrides += TINY_OVERRIDES
    cls, cfg = load_run_config(config, [*run_overrides, *overrides])
    # Training wall time accumulates across resumed invocations (a re-run that finds the run
    # finished only re-exports, and reports the time the training itself took).
    timing_file = run_dir / "demo_timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"wall_s": 0.0}
    t0 = time.perf_counter()
    trainer = cls(cfg)
    last = trainer.fit(resume="latest")
    timing["wall_s"] = round(timing["wall_s"] + time.perf_counter() - t0, 1)
    timing["threads"] = torch.get_num_threads()
    timing_file.write_text(json.dumps(timing))
    export = run_dir / "export"
    return {"label": m.label, "config": f"configs/{m.config}", "train_steps": steps,
            "batch_size": cfg.train.batch_size, "wall_s": timing["wall_s"],
            "threads": timing["threads"], "export": str(export),
            "lora": not (export / "model_index.json").exists(), "last_logs": last}


def _train_worker(job: tuple) -> tuple[str, dict]:
    """One method in a worker process (``--jobs``): its share of the CPU threads."""
    key, out, steps, tiny, threads = job
    torch.set_num_threads(threads)
    return key, train_method(key, Path(out), steps=steps, tiny=tiny,
                             overrides=["log.progress=false", "log.heartbeat_s=10",
                                        f"log.name={json.dumps(METHODS[key].label)}"])


def train_methods(keys: Sequence[str], out: Path, *, steps: Optional[int] = None,
                  tiny: bool = False, jobs: int = 1) -> dict:
    """Train ``keys`` one after another (``jobs`` = 1, with progress bars) or in ``jobs``
    worker processes that split the CPU threads (one line per finished method)."""
    if jobs <= 1 or len(keys) <= 1:
        trained = {}
        for i, key in enumerate(keys):
            m = METHODS[key]
            print(f"      [{i + 1}/{len(keys)}] {m.label} ({m.config}, "
                  f"{steps or m.train_steps} steps)")
            trained[key] = train_method(key, out, steps=steps, tiny=tiny)
            print(f"      {m.label}: {trained[key]['wall_s']:.0f} s -> {trained[key]['export']}")
        return trained
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"      {len(keys)} methods in {jobs} worker processes ({threads} thread(s) each); "
          "each reports its step, speed and ETA every 10 s and a line when done")
    done = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_train_worker, (k, str(out), steps, tiny, threads))
                   for k in keys]
        for f in as_completed(futures):
            key, info = f.result()
            done[key] = info
            print(f"      {info['label']}: {info['train_steps']} steps in {info['wall_s']:.0f} s"
                  f" -> {info['export']}")
    return {k: done[k] for k in keys}


def bench_models(trained: dict, world_teachers: dict, tiny: bool = False,
                 teachers: bool = True) -> list[dict]:
    """Bench entries: every teacher a student distills (with the sampler and best CFG the
    world's report measured it with — ``world.json``'s ``teachers``; DDIM and 2 where absent;
    unless ``teachers`` is false) and the students (their exports, sampled as each records)."""
    teachers = list(dict.fromkeys(METHODS[k].teacher for k in trained)) if teachers else []
    steps = [1, 2] if tiny else list(TEACHER_STEPS)
    models = []
    for t in teachers:
        info = world_teachers.get(t, {})
        sampler = info.get("sampler", "ddim")
        models.append({"name": f"teacher ({t.split('_')[1]}, {SAMPLER_LABELS[sampler]})",
                       "path": f"world:{t}", "sampler": sampler, "steps": steps,
                       "guidance_scale": float(info.get("best_guidance_scale", 2.0))})
    for key, info in trained.items():
        m = METHODS[key]
        entry = {"name": m.label, "sampler": "auto",
                 "steps": [1] if tiny else list(m.bench_steps)}
        if info["lora"]:
            entry.update(path=f"world:{m.teacher}", lora=info["export"])
        else:
            entry["path"] = info["export"]
        models.append(entry)
    return models


def run_bench_for(models: list[dict], out: Path, *, num_samples: int, tiny: bool = False,
                  effnet: bool = False, command: str = "diffdistill demo"):
    from diffdistill.config import build_config
    from diffdistill.eval.bench_config import BenchConfig
    from diffdistill.eval.harness import run_bench

    cfg = build_config(BenchConfig, {
        "models": models, "num_samples": num_samples, "batch_size": min(250, num_samples),
        "prompts": {"kind": "classes", "template": 0},
        "reference": {"kind": "fashion_mnist_test"},
        # FD-EffNetLite0 runs the ImageNet net at 224 px: ~11 img/s on 2 CPU cores, so
        # ~15 min for the reference split and ~1.5 min per 1000-sample row — opt-in
        "detectors": ["fmnist-net", "effnet-lite0"] if effnet else ["fmnist-net"],
        "clip": {"detector": "world-clip-judge"}, "grid_samples": min(10, num_samples),
        "out": str(out / "bench"), "warmup": not tiny,
    })
    return run_bench(cfg, command=f"{command} (bench stage)")


def best_student(results, students: Sequence[str]):
    """The student row with the lowest first Fréchet distance (ties: fewer steps)."""
    metric = results.metrics[0]
    rows = [r for r in results.rows if r.model in students and r.metrics.get(metric) is not None]
    return min(rows, key=lambda r: (r.metrics[metric], r.steps)) if rows else None


def _world_check() -> dict:
    from diffdistill.world import TEACHERS, asset_path, world_info

    info = world_info()
    missing = [t for t in TEACHERS if not (asset_path(t) / "model_index.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"the embedded world has no {', '.join(missing)} in {asset_path('')}: build it "
            "with `diffdistill world build` (about an hour on 2 CPU cores)")
    return info


def _training_rows(result: DemoResult) -> tuple[list[str], list[list[str]]]:
    head = ["method", "config", "train steps", "batch", "train wall (s)", "threads", "adapter"]
    rows = [[t["label"], t["config"], str(t["train_steps"]), str(t["batch_size"]),
             f"{t['wall_s']:.0f}", str(t["threads"]), "LoRA" if t["lora"] else "full"]
            for t in result.trained.values()]
    return head, rows


def _write_demo_html(result: DemoResult, command: str, total_s: float, bench_dir: Path) -> Path:
    """``report.html``: what was trained, then the bench's table, grids and curves."""
    import html

    from diffdistill.eval.html_report import bench_sections, table_html, write_html

    head, rows = _training_rows(result)
    intro = (f"<p class=\"note\">Command: <code>{html.escape(command)}</code>; "
             f"{total_s / 60:.1f} min in all. Train wall: each method's own training time.</p>")
    sections = [("Training", intro + table_html(head, rows, 2)),
                *bench_sections(result.bench, bench_dir)]
    return write_html(result.paths["report"], f"diffdistill demo — {time.strftime('%Y-%m-%d')}",
                      sections)


def _markdown(result: DemoResult, command: str, total_s: float) -> str:
    from diffdistill.eval.report import markdown_table

    lines = [f"# diffdistill demo — {time.strftime('%Y-%m-%d')}", "",
             f"Command: `{command}`; this invocation took {total_s / 60:.1f} min. \"train "
             "wall\" is each method's own training time, kept across invocations (a finished "
             "run is only re-exported).", "",
             "| method | config | train steps | batch | train wall (s) | threads | adapter |",
             "|---|---|---:|---:|---:|---:|---|"]
    for cells in _training_rows(result)[1]:
        cells[1] = f"`{cells[1]}`"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", markdown_table(result.bench)]
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", methods: Optional[Sequence[str]] = None,
             train_steps: Optional[int] = None, num_samples: int = 1000, tiny: bool = False,
             jobs: int = 1, effnet: bool = False, teachers: bool = True,
             command: str = "diffdistill demo") -> DemoResult:
    from diffdistill.world.info import teacher_grids, teacher_table

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    methods = list(methods or DEFAULT_METHODS)
    unknown = [k for k in methods if k not in METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {', '.join(METHODS)}")
    if tiny and train_steps is None:  # --smoke checks the path: a few steps, not the budgets
        train_steps = SMOKE_STEPS
    t0 = time.perf_counter()
    world = _world_check()
    n = 4
    print(f"[1/{n}] the embedded world's teachers (world.json):\n")
    print(teacher_table(world) + "\n")
    grids = teacher_grids(root, num=4 if tiny else 20, steps=2 if tiny else 25)
    for name, p in grids.items():
        print(f"      {name} sample grid: {p}")
    result = DemoResult(out=root)
    print(f"\n[2/{n}] distilling the teacher: {', '.join(METHODS[k].label for k in methods)}")
    result.trained = train_methods(methods, root, steps=train_steps, tiny=tiny, jobs=jobs)
    print(f"\n[{n - 1}/{n}] diffdistill bench: {'teacher and ' if teachers else ''}"
          f"students, {num_samples} samples each")
    result.bench = run_bench_for(bench_models(result.trained, world.get("teachers", {}), tiny,
                                              teachers), root,
                                 num_samples=num_samples, tiny=tiny, effnet=effnet,
                                 command=command)
    total = time.perf_counter() - t0
    bench_dir = root / "bench"
    result.paths = {"results": root / "results.md", "grid": bench_dir / "grid.png",
                    "plot": bench_dir / "fid_vs_steps.png",
                    "convergence_json": bench_dir / "convergence.json",
                    "convergence_plot": bench_dir / "convergence.png",
                    "report": root / "report.html", **grids}
    text = _markdown(result, command, total)
    result.paths["results"].write_text(text)
    _write_demo_html(result, command, total, bench_dir)
    (root / "demo.json").write_text(json.dumps(
        {"command": command, "total_s": round(total, 1), "trained": result.trained,
         "num_samples": num_samples}, indent=1, default=str))
    print(f"\n[{n}/{n}] results ({total / 60:.1f} min in all)\n")
    print(text)
    print(f"  table      : {result.paths['results']}")
    print(f"  sample grid: {result.paths['grid']} (rows: the table's models; columns: the "
          "same seeds and prompts)")
    print(f"  FID vs steps: {result.paths['plot']}")
    if result.paths["convergence_plot"].exists():
        print(f"  convergence: {result.paths['convergence_plot']} (FID of "
              f"{EVAL_SAMPLES if not tiny else 8} samples vs training step and wall time)")
    print(f"  one page with all of it: {result.paths['report']}")
    best = best_student(result.bench, [METHODS[k].label for k in methods])
    if best is not None:
        key = next(k for k in methods if METHODS[k].label == best.model)
        card = Path(result.trained[key]["export"]) / "README.md"
        print(f"\nBest student: {best.model} at {best.steps} step(s) "
              f"({result.bench.metrics[0]} {best.metrics[result.bench.metrics[0]]:.2f}). "
              f"Load it in stock diffusers ({card}):\n")
        if card.exists():
            from diffdistill.export import card_code

            print(card_code(card))
    return result
