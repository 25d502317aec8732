"""diffdistill: turn multi-step diffusion models into fast one- to few-step generators.

The public API (the same objects the ``diffdistill`` command uses)::

    from diffdistill import bench, export_run, get_trainer, load_run_config

    cfg = load_run_config("lcd/toy_lora.yaml", ["train.max_steps=400"])
    get_trainer(cfg).fit()

Names are loaded on first use, so ``import diffdistill`` does not import torch. (The
function is ``export_run``: ``diffdistill.export`` is the export module.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first attribute access). The API
#: lives in the application layer (diffdistill/app/api.py): it wires trainers and evaluation.
_LAZY = {
    "load_run_config": "diffdistill.app.api",
    "get_trainer": "diffdistill.app.api",
    "export_run": "diffdistill.app.api",
    "load_bench_config": "diffdistill.app.api",
    "bench": "diffdistill.app.api",
    "ConfigError": "diffdistill.config",
    "generate": "diffdistill.sampling",
}

__all__ = ["__version__", "load_run_config", "get_trainer", "export_run", "load_bench_config",
           "bench", "ConfigError", "generate"]
assert set(__all__) == {"__version__", *_LAZY}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffdistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
