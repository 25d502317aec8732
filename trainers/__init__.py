"""Method trainers (installed as ``diffdistill.trainers``), one file per method.

``TRAINERS`` maps a config's ``method`` to its trainer class, imported lazily so that
``diffdistill --help`` stays fast.
"""

from __future__ import annotations

import importlib

TRAINERS = {
    "pretrain": ("diffdistill.trainers.pretrain", "PretrainTrainer"),
    "ict": ("diffdistill.trainers.ict", "ICTTrainer"),
    "lcd": ("diffdistill.trainers.lcd", "LCDTrainer"),
    "rglcd": ("diffdistill.trainers.lcd", "RGLCDTrainer"),
    "dmd2": ("diffdistill.trainers.dmd2", "DMD2Trainer"),
    "fdistill": ("diffdistill.trainers.fdistill", "FDistillTrainer"),
    "hypersd": ("diffdistill.trainers.hypersd", "HyperSDTrainer"),
    "scm": ("diffdistill.trainers.scm", "SCMTrainer"),
    "meanflow": ("diffdistill.trainers.meanflow", "MeanFlowTrainer"),
    "rcm": ("diffdistill.trainers.rcm", "RCMTrainer"),
}


def get_trainer_class(method: str):
    from diffdistill.config import ConfigError

    if method not in TRAINERS:
        raise ConfigError(
            f"method={method!r} is unknown; choose one of {', '.join(sorted(TRAINERS))}"
        )
    module, name = TRAINERS[method]
    return getattr(importlib.import_module(module), name)


def load_run_config(path, overrides=()):
    """YAML file + dotted overrides → (trainer class, validated config)."""
    from diffdistill.config import (
        ConfigError,
        build_config,
        deep_merge,
        find_config,
        load_yaml,
        parse_overrides,
    )

    path = find_config(path)  # a file, or a packaged config by name (lcd/toy_lora.yaml)
    data = deep_merge(load_yaml(path), parse_overrides(list(overrides)))
    method = data.get("method")
    if not method:
        raise ConfigError(f"{path}: the config has no 'method' key (one of "
                          f"{', '.join(sorted(TRAINERS))})")
    cls = get_trainer_class(method)
    return cls, build_config(cls.config_class, data)
