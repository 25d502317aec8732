"""Bench report: ``results.json`` (every number + the machine and command), ``results.md``
(one row per model × steps), ``grid.png`` (rows = models × steps, columns = the same seeds)
and ``fid_vs_steps.png`` (each Fréchet distance against the number of steps, one line per
model; matplotlib's Agg canvas, so no display and no global backend change).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "BenchResults", "BenchRow", "load_results", "machine_info",
           "markdown_table", "plot_metric_vs_steps", "save_grid_rows", "write_report"]

FORMAT = "diffdistill-bench/1"
CLIP_METRIC = "CLIP score"
#: the metric columns that are not Fréchet distances (the plot shows only those)
SAMPLE_METRICS = (CLIP_METRIC, "precision", "recall", "class agreement")
JUDGE_IS_REWARD = "judge = reward"


@dataclass
class BenchRow:
    model: str
    steps: int
    sampler: str
    guidance_scale: float
    timesteps: list
    num_samples: int
    metrics: dict  # metric name -> value (None where it does not apply)
    sec_per_image: float
    peak_memory_mb: float | None  # None: not measured on this platform
    peak_memory_kind: str  # cuda_max_allocated | cpu_peak_rss_delta
    path: str = ""
    lora: str | None = None
    seed_ranges_by_rank: list = field(default_factory=list)  # per rank: [[start, stop), ...]
    judge_is_reward: bool = False  # its CLIP judge is the reward network it was trained on


@dataclass
class BenchResults:
    rows: list
    metrics: list  # column order
    protocol: dict
    machine: dict
    command: str
    config: dict = field(default_factory=dict)
    grid_seeds: list = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    format: str = FORMAT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid_rows"] = [f"{r.model} @ {r.steps}" for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> BenchResults:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} results file (format={data.get('format')!r})")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["rows"] = [BenchRow(**r) for r in data["rows"]]
        return cls(**kw)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device=None, num_processes: int = 1) -> dict:
    """CPU model and count, GPU, library versions — what a number was measured on."""
    import diffusers

    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "num_processes": int(num_processes),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
    }
    for lib in ("transformers", "accelerate", "open_clip"):
        try:
            info[lib] = __import__(lib).__version__
        except (ImportError, AttributeError):
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    commit = _git_commit()
    if commit:
        info["commit"] = commit
    return info


def _git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when files differ from it), or "" outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------- files


def load_results(path) -> BenchResults:
    return BenchResults.from_dict(json.loads(Path(path).read_text()))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if round(v, 4) == 0:  # a Fréchet distance of 0 up to rounding prints as 0, not -0
        v = 0.0
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def table_parts(results: BenchResults) -> tuple[str, list[str], list[list[str]], list[str]]:
    """The bench table's pieces, shared by the markdown and the HTML report: the protocol
    sentence, the header, one row of cells per model × steps, and the notes below it."""
    p = results.protocol
    head = ["model", "steps", "sampler", "guidance", *results.metrics, "s/img", "peak mem (MB)"]
    intro = (f"N = {p.get('num_samples')} samples, seeds {p.get('seeds')}, prompts: "
             f"{p.get('prompts')}; reference: {p.get('reference')}.")
    def cell(r: BenchRow, m: str) -> str:
        text = _fmt(r.metrics.get(m))
        return f"{text} ({JUDGE_IS_REWARD})" if m == CLIP_METRIC and r.judge_is_reward else text

    rows = [[r.model, str(r.steps), r.sampler, f"{r.guidance_scale:g}",
             *[cell(r, m) for m in results.metrics], f"{r.sec_per_image:.4f}",
             "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.1f}"]
            for r in results.rows]
    kinds = sorted({r.peak_memory_kind for r in results.rows})
    notes = []
    for name, text in (p.get("fd") or {}).items():
        notes.append(f"{name}: {text}.")
    if p.get("clip_score"):
        notes.append(f"{CLIP_METRIC}: {p['clip_score']}.")
    if any(r.judge_is_reward for r in results.rows):
        notes.append(f"{JUDGE_IS_REWARD}: the model was trained against the very network that "
                     "gives its CLIP score (same weights); that score is not evidence.")
    for key, label in (("precision_recall", "precision / recall"),
                       ("class_agreement", "class agreement")):
        if p.get(key):
            notes.append(f"{label}: {p[key]}.")
    notes.append(f"s/img: {p.get('sec_per_image')}.")
    notes.append(f"peak mem ({', '.join(kinds)}): {p.get('peak_memory')}.")
    m = results.machine
    notes.append(f"machine: {m.get('gpu') or m.get('cpu')}, {m.get('num_processes')} "
                 f"process(es), torch {m.get('torch')}, diffusers {m.get('diffusers')}; "
                 f"{results.date}" + (f"; commit {m['commit']}." if m.get("commit") else "."))
    notes.append(f"command: `{results.command}`")
    return intro, head, rows, notes


def markdown_table(results: BenchResults) -> str:
    """The table (one row per model × steps) under a short statement of the protocol."""
    intro, head, rows, notes = table_parts(results)
    lines = [intro, "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def save_grid_rows(rows: Sequence[torch.Tensor | None], path, pad: int = 2,
                   labels: Sequence[str] | None = None) -> Path | None:
    """One grid row per entry (uint8 ``[cols, 3, H, W]``, same seeds in every row). Rows of
    another image size (models of different resolutions evaluated natively) are resized to
    the largest for display only (LANCZOS). ``labels``: one per row (e.g. "DMD2 @ 1"),
    written in a margin left of the row, so the image says whose samples each row holds."""
    from diffdistill.eval.generation import resize_for_eval

    from diffdistill.images import save_grid

    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} grid rows")
    kept = [i for i, r in enumerate(rows) if r is not None]
    if not kept:
        return None
    rows = [rows[i] for i in kept]
    cols = rows[0].shape[0]
    if any(r.shape[0] != cols for r in rows):
        raise ValueError(f"grid rows differ in length: {[r.shape[0] for r in rows]}")
    size = max(max(r.shape[-2:]) for r in rows)
    rows = [resize_for_eval(r, size) for r in rows]
    path = save_grid(torch.cat(rows), path, nrow=cols)
    if labels is not None:
        _label_rows(path, [labels[i] for i in kept], size, pad)
    return path


def _label_rows(path: Path, labels: Sequence[str], size: int, pad: int) -> None:
    """Prepend a margin with each row's label, vertically centred on its row (atomic)."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.open(path).convert("RGB")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(grid)
    width = int(max(probe.textlength(t, font=font) for t in labels)) + 2 * pad + 4
    out = Image.new("RGB", (grid.width + width, grid.height), (0, 0, 0))
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        top, bottom = font.getbbox(text)[1], font.getbbox(text)[3]
        y = pad + r * (size + pad) + (size - (bottom - top)) // 2 - top
        draw.text((pad + 2, y), text, fill=(255, 255, 255), font=font)
    tmp = path.with_name(path.name + ".tmp.png")
    out.save(tmp)
    os.replace(tmp, path)


def plot_metric_vs_steps(results: BenchResults, path, metrics: Sequence[str] | None = None
                         ) -> Path:
    """One panel per metric (default: every Fréchet distance; the CLIP score if none), a line
    per model over its step counts (log₂ axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metrics is None:
        metrics = ([m for m in results.metrics if m not in SAMPLE_METRICS]
                   or list(results.metrics))
    fig = Figure(figsize=(4.2 * max(len(metrics), 1), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    models = list(dict.fromkeys(r.model for r in results.rows))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for name in models:
            pts = sorted((r.steps, r.metrics.get(metric)) for r in results.rows
                         if r.model == name and r.metrics.get(metric) is not None)
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({r.steps for r in results.rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs steps")
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure and write it as PNG atomically (temp file + rename)."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def write_report(results: BenchResults, grid_rows: Sequence | None = None, out=".") -> dict:
    """Write results.json, results.md, grid.png (when rows are given) and fid_vs_steps.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    _atomic_write(paths["json"], json.dumps(results.to_dict(), indent=1, default=str) + "\n")
    _atomic_write(paths["markdown"], markdown_table(results))
    if grid_rows is not None:
        grid = save_grid_rows(grid_rows, out / "grid.png",
                              labels=[f"{r.model} @ {r.steps}" for r in results.rows])
        if grid is not None:
            paths["grid"] = grid
    if results.rows and results.metrics:
        paths["plot"] = plot_metric_vs_steps(results, out / "fid_vs_steps.png")
    return paths
