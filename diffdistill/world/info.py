"""Reading the embedded world: sampling its teachers (sample i: seed + i, class i % 10),
asset sizes, the teacher table, ``diffdistill world info``. Used by the build's report stage
and by ``diffdistill demo``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import ASSETS_DIR


def teacher_prompts(n: int) -> tuple[list[int], list[str]]:
    """Labels ``i % 10`` and the evaluation's captions of samples 0..n−1 ("a photo of a
    t-shirt", ...)."""
    from diffdistill.eval.prompts import EvalPrompts

    prompts = EvalPrompts()
    return [i % 10 for i in range(n)], [prompts.caption(i) for i in range(n)]


@torch.no_grad()
def sample_teacher(path, num: int, *, steps: int = 25, guidance_scale: float = 2.0,
                   seed: int = 0, sampler=None, batch_size: int = 250,
                   backbone=None) -> torch.Tensor:
    """uint8 samples ``[num, 3, 32, 32]`` of a world teacher through the shared sampler
    (default :attr:`~diffdistill.backbone.Backbone.ode_sampler`): sample i has seed ``seed + i`` and class ``i % 10``
    (its caption for the text-to-image ones) — the evaluation's own sample i
    (:meth:`~diffdistill.eval.eval_model.EvalModel.sample`)."""
    from diffdistill.backbone import load_backbone
    from diffdistill.eval.eval_model import EvalModel

    bb = backbone or load_backbone(path)
    model = EvalModel("teacher", bb, bb.denoiser(), sampler or bb.ode_sampler,
                      guidance_scale=float(guidance_scale))
    return model.sample([seed + i for i in range(num)], steps, resolution=32,
                        batch_size=batch_size)


def asset_sizes(out=None) -> dict[str, int]:
    out = Path(out or ASSETS_DIR)
    return {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*"))
            if f.is_file() and not f.name.startswith(".")}


def teacher_table(world: dict) -> str:
    """Markdown table of the report stage's quick teacher measurements."""
    lines = ["| teacher | CFG | sampler | steps | samples | FID-FMNIST | "
             "CLIP score (reward CLIP) | CLIP score (judge) | class acc. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in world.get("teachers", {}).items():
        for row in t["rows"]:
            star = " (best)" if row["guidance_scale"] == t["best_guidance_scale"] else ""
            judge = (f"{row['clip_score_judge']:.4f}" if "clip_score_judge" in row
                     else "not measured")
            lines.append(f"| {name} | {row['guidance_scale']:g}{star} | "
                         f"{t.get('sampler', 'ddim')} | {t['steps']} | "
                         f"{t['num_samples']} | {row['fid_fmnist']:.2f} | "
                         f"{row['clip_score']:.4f} | {judge} | {row['class_accuracy']:.3f} |")
    return "\n".join(lines)


def teacher_grids(out_dir, assets=None, *, num: int = 20, steps: int = 25,
                  seed: int = 0) -> dict[str, Path]:
    """Sample the shipped teachers (their ``ode_sampler``, ``steps``, the CFG scale the
    report found best, else 2) and write ``OUT_DIR/<teacher>_grid.png`` — what ``make demo``
    shows."""
    from diffdistill.images import save_grid

    from . import TEACHERS, world_dir, world_info

    assets = Path(assets or world_dir())
    try:
        teachers = world_info(assets).get("teachers", {})
    except FileNotFoundError:
        teachers = {}
    paths = {}
    for name in TEACHERS:
        gs = float(teachers.get(name, {}).get("best_guidance_scale", 2.0))
        imgs = sample_teacher(assets / name, num, steps=steps, guidance_scale=gs, seed=seed)
        paths[name] = save_grid(imgs, Path(out_dir) / f"{name}_grid.png", nrow=10, scale=3)
    return paths


def format_info(out=None) -> str:
    """What ``diffdistill world info`` prints: stages, accuracies, sizes, the teacher table."""
    from . import SIZE_BUDGET_BYTES, STAGES

    out = Path(out or ASSETS_DIR)
    path = out / "world.json"
    if not path.exists():
        return (f"{out}: no world.json — the embedded world is not built. Build it with "
                "`diffdistill world build` (about an hour on 2 CPU cores).")
    world = json.loads(path.read_text())
    lines = [f"embedded world in {out} (scale {world.get('scale')}, seed {world.get('seed')})",
             f"rebuild: {world.get('command')}",
             f"last invocation: {world.get('last_command', world.get('command'))}", "",
             "| stage | wall s | CPU s | finished | built by |", "|---|---|---|---|---|"]
    for name in STAGES:
        s = world.get("stages", {}).get(name)
        if s:
            lines.append(f"| {name} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['finished']} | "
                         f"{s.get('command', '—')} |")
        else:
            lines.append(f"| {name} | — | — | not built | |")
    lines.append("")
    for k, v in world.get("accuracies", {}).items():
        lines.append(f"{k}: {v:.4f}")
    sizes = asset_sizes(out)
    total = sum(sizes.values())
    lines.append(f"shipped files: {len(sizes)}, {total / 1e6:.2f} MB "
                 f"(budget {SIZE_BUDGET_BYTES / 1e6:.0f} MB)")
    if world.get("teachers"):
        lines += ["", teacher_table(world)]
    return "\n".join(lines)
