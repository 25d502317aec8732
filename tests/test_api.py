"""The Python API: ``import diffdistill`` stays cheap, ``__all__`` names what is public, and
the README's API snippet runs on the embedded world (with a tiny budget)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_api_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_is_cheap_and_all_names_resolve():
    code = ("import sys, diffdistill; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(diffdistill.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import diffdistill

    for name in diffdistill.__all__:
        assert getattr(diffdistill, name) is not None, name
        obj = getattr(diffdistill, name)
        assert name == "__version__" or obj.__doc__, f"{name} has no docstring"
    with pytest.raises(AttributeError):
        diffdistill.no_such_name  # noqa: B018
    from diffdistill import losses  # submodules still import as before

    assert hasattr(losses, "pseudo_huber")


def test_api_is_what_the_cli_runs(tmp_path):
    from diffdistill.trainers import load_run_config as cli_loader

    from diffdistill import ConfigError, get_trainer, load_run_config

    cfg = load_run_config("lcd/toy_lora.yaml", ["train.lr=5e-4"])
    cls, cli_cfg = cli_loader("lcd/toy_lora.yaml", ["train.lr=5e-4"])
    assert cfg == cli_cfg and cfg.train.lr == 5e-4
    assert type(get_trainer(cfg)) is cls
    with pytest.raises(ConfigError, match="train.lrr"):
        load_run_config("lcd/toy_lora.yaml", ["train.lrr=1"])
    from diffdistill import export_run

    with pytest.raises(FileNotFoundError, match="config.yaml"):
        export_run(tmp_path)


TINY = {  # the snippet's budget -> a few seconds
    '"train.max_steps=400"': ('"train.max_steps=2", "train.batch_size=4", "data.limit=16", '
                              '"train.checkpoint_every=2", "log.tensorboard=false", '
                              '"log.progress=false", "log.grid_every=0", "train.cpu=true"'),
    '"num_samples": 1000': '"num_samples": 24, "batch_size": 12, "grid_samples": 4, '
                           '"progress": False',
}


def test_readme_api_snippet_runs_on_the_world(tmp_path, monkeypatch):
    code = readme_api_snippet()
    for old, new in TINY.items():
        assert old in code, f"the README's API snippet changed: {old} is gone"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    export = tmp_path / "runs" / "api" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    rows = scope["results"].rows
    assert [r.steps for r in rows] == [1, 4]
    assert all(r.metrics["FID-FMNIST"] > 0 and r.num_samples == 24 for r in rows)
    assert (tmp_path / "runs" / "api" / "bench" / "results.json").is_file()
