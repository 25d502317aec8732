"""Convergence curves: a student's quick metric against training step and wall time.

Every trainer's periodic evaluation (``eval.every``; :func:`diffdistill.eval.harness.quick_eval`)
writes lines like ``{"step": 250, "eval/fid_fmnist_1step": 7.4, "train_wall_s": 131.0}`` to its
run's ``metrics.jsonl``. This module reads those lines back — it needs the run folders, not the
trainers — and draws every method of a demo or bench run on one figure, so a user picks a
method by how fast it gets how good, not only by its end point.

``convergence.json``: ``{label: {"metric": key, "steps": [...], "wall_s": [...],
"values": [...]}}``; ``convergence.png``: two panels, metric vs step and metric vs seconds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

EVAL_PREFIX = "eval/"
_STEP_KEY = re.compile(r"_\d+step$")  # eval/fid_fmnist_1step: a metric at a step count


def read_curves(run_dir, label: str) -> dict[str, dict]:
    """The periodic-eval curves of one run: one entry per logged sample-quality key
    (``eval/<metric>_<N>step``; diagnostics such as ``eval/d_auc`` are not curves of it).

    The label gets the key's step count when a run evaluates several (``DMD2 (1 step)``).
    A step logged twice (a run resumed from an earlier checkpoint) keeps its last value.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows: dict[str, dict[int, tuple[float | None, float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        for key, value in row.items():
            if key.startswith(EVAL_PREFIX) and value is not None and _STEP_KEY.search(key):
                rows.setdefault(key, {})[int(row["step"])] = (row.get("train_wall_s"),
                                                               float(value))
    curves = {}
    for key, by_step in rows.items():
        steps = sorted(by_step)
        name = label if len(rows) == 1 else f"{label} ({_steps_of(key)})"
        curves[name] = {"metric": key, "steps": steps,
                        "wall_s": [by_step[s][0] for s in steps],
                        "values": [by_step[s][1] for s in steps]}
    return curves


def _steps_of(key: str) -> str:
    tail = key.rsplit("_", 1)[-1]  # "1step"
    return tail.replace("step", " step") if tail.endswith("step") else key


def training_run_of(path) -> Path | None:
    """The training run an export folder came from (``<run>/export`` beside the run's
    ``metrics.jsonl``), or None (a teacher, a hub-style folder, ``world:NAME``)."""
    if not path or str(path).startswith("world:"):
        return None
    run = Path(path).resolve().parent
    return run if (run / "metrics.jsonl").is_file() else None


def collect(runs: Mapping[str, os.PathLike | str]) -> dict[str, dict]:
    """``{label: run folder}`` → every run's curves, in the given order."""
    out: dict[str, dict] = {}
    for label, run_dir in runs.items():
        out.update(read_curves(run_dir, label))
    return out


def write_convergence(curves: Mapping[str, dict], out) -> dict[str, Path]:
    """``convergence.json`` and (when any curve has a point) ``convergence.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "convergence.json"}
    tmp = paths["json"].with_name("convergence.json.tmp")
    tmp.write_text(json.dumps(dict(curves), indent=1) + "\n")
    os.replace(tmp, paths["json"])
    if any(c["values"] for c in curves.values()):
        paths["plot"] = plot_convergence(curves, out / "convergence.png")
    return paths


def plot_convergence(curves: Mapping[str, dict], path) -> Path:
    """Metric vs optimizer step (left) and vs training wall time (right), a line per curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_step, ax_wall = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    from matplotlib.ticker import ScalarFormatter

    # eval/fid_fmnist_1step, eval/fid_fmnist_4step -> "fid_fmnist" (the step count is in the
    # legend); several metric families -> a generic label
    families = sorted({c["metric"].removeprefix(EVAL_PREFIX).rsplit("_", 1)[0]
                       for c in curves.values()})
    ylabel = families[0] if len(families) == 1 else "quick metric"
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"  # one colour per run in both panels (some runs lack wall times)
        ax_step.plot(c["steps"], c["values"], marker="o", markersize=3, label=name, color=color)
        timed = [(w, v) for w, v in zip(c["wall_s"], c["values"]) if w is not None]
        if timed:
            ax_wall.plot([w for w, _ in timed], [v for _, v in timed], marker="o",
                         markersize=3, label=name, color=color)
    for ax, xlabel in ((ax_step, "training step"), (ax_wall, "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        for axis in (ax.yaxis,):  # plain numbers (5, 10, 20), not 10^1 on a log axis
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, alpha=0.3, which="both")
    ax_step.set_title("convergence by step")
    ax_wall.set_title("convergence by wall time")
    ax_step.legend(fontsize=7)
    from diffdistill.eval.report import save_figure

    return save_figure(fig, path)
