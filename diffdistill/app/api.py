"""The Python API (``from diffdistill import ...``): the objects the ``diffdistill`` command uses, callable from a script.

::

    from diffdistill import bench, export_run, get_trainer, load_run_config

    cfg = load_run_config("lcd/toy_lora.yaml", ["train.max_steps=400", "output_dir=runs/lcm"])
    trainer = get_trainer(cfg)
    trainer.fit()                      # checkpoints, logs, and runs/lcm/export at the end
    folder = export_run("runs/lcm")    # re-export the newest checkpoint (optional)
    results = bench("bench/world.yaml", ["num_samples=1000"])

``diffdistill train`` is ``get_trainer(load_run_config(path, overrides)).fit(resume=...)``;
``diffdistill export`` is :func:`export_run`; ``diffdistill bench`` is :func:`bench`. Nothing
here downloads anything: model paths are local diffusers folders or ``world:NAME``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # the real imports pull in torch / diffusers: only when called
    from diffdistill.config import BaseConfig
    from diffdistill.eval.bench_config import BenchConfig
    from diffdistill.eval.report import BenchResults
    from diffdistill.trainers.base import Trainer

PathLike = Union[str, os.PathLike]

__all__ = ["load_run_config", "get_trainer", "export_run", "load_bench_config", "bench"]


def load_run_config(path: PathLike, overrides: Sequence[str] = ()) -> "BaseConfig":
    """A run config: the YAML file (or a packaged config by name, e.g. ``"dmd2/toy.yaml"``)
    plus dotted ``key=value`` overrides, validated before any model loads.

    Returns the method's config dataclass (``cfg.method`` names the trainer). Raises
    :class:`diffdistill.config.ConfigError` naming the key for an unknown key, a wrong type
    or an impossible combination.
    """
    from diffdistill.trainers import load_run_config as _load

    _, cfg = _load(path, list(overrides))
    return cfg


def get_trainer(cfg: "BaseConfig") -> "Trainer":
    """The trainer for ``cfg.method`` (pretrain, ict, lcd, rglcd, dmd2, fdistill, hypersd),
    built but not yet set up: call ``.fit(resume=None | "latest" | PATH)`` to train."""
    from diffdistill.trainers import get_trainer_class

    return get_trainer_class(cfg.method)(cfg)


def export_run(run_dir: PathLike, out: PathLike | None = None, *,
           checkpoint: str = "latest") -> Path:
    """(Re-)export a training run's checkpoint (``"latest"`` or a checkpoint folder) as a
    LoRA or a full pipeline folder with its model card; ``out`` defaults to
    ``RUN_DIR/export``. Returns the export folder. (``Trainer.fit`` already exports at
    the end of a run; this is for an earlier checkpoint or a run that was stopped.)"""
    return _export_checkpoint(run_dir, out, checkpoint)[1]


def _export_checkpoint(run_dir: PathLike, out: PathLike | None, checkpoint: str):
    """``export_run``'s work: returns (the checkpoint exported, the export folder). Holds the
    run folder's lock (no export while a run trains there) and writes the export atomically
    (the previous one stays whole if the write fails)."""
    import yaml

    from diffdistill.config import ConfigError, build_config
    from diffdistill.trainers import get_trainer_class
    from diffdistill.trainers.checkpointing import list_checkpoints
    from diffdistill.trainers.run_guard import guard_output_dir

    run = Path(run_dir)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run} has no config.yaml; is it a training output_dir?")
    if checkpoint == "latest" and not list_checkpoints(run):
        raise FileNotFoundError(f"no checkpoint found in {run / 'checkpoints'}")
    data = yaml.safe_load(cfg_file.read_text())
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{cfg_file} has no 'method' key")
    cls = get_trainer_class(data["method"])
    cfg = build_config(cls.config_class, data)
    cfg.output_dir = str(run)  # the folder as it is now (it may have been moved)
    trainer = cls(cfg)
    with guard_output_dir(trainer.accelerator, run, check_reuse=False):
        trainer.setup(resume=checkpoint)
        if trainer.last_checkpoint is None:
            raise FileNotFoundError(f"no checkpoint found in {run / 'checkpoints'}")
        folder = trainer.write_export(Path(out) if out is not None else run / "export")
    return trainer.last_checkpoint, Path(folder)


def load_bench_config(config: PathLike | Mapping[str, Any],
                      overrides: Sequence[str] = ()) -> "BenchConfig":
    """A bench config from a YAML file (or a packaged one, e.g. ``"bench/world.yaml"``) or a
    dict with the same keys, plus dotted overrides; validated."""
    from diffdistill.eval.bench_config import BenchConfig, _normalise_bench_dict
    from diffdistill.eval.bench_config import load_bench_config as _load

    if not isinstance(config, Mapping):
        return _load(config, list(overrides))
    from diffdistill.config import build_config, deep_merge, parse_overrides

    data = deep_merge(_normalise_bench_dict(dict(config)),
                      _normalise_bench_dict(parse_overrides(list(overrides))))
    return build_config(BenchConfig, data)


def bench(config: PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
          ) -> "BenchResults":
    """Evaluate every model × step count of a bench config (see :func:`load_bench_config`):
    Fréchet distances, CLIP score, precision / recall, s/img, peak memory. Writes
    ``results.json``, ``results.md``, ``grid.png`` and ``fid_vs_steps.png`` into the
    config's ``out`` folder and returns the rows (``results.rows[i].metrics``)."""
    from diffdistill.eval.harness import run_bench

    cfg = load_bench_config(config, overrides)
    where = config if not isinstance(config, Mapping) else "<dict>"
    return run_bench(cfg, command=" ".join(["diffdistill.bench(", str(where),
                                            *overrides, ")"]))
