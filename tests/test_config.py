import os
from pathlib import Path

import pytest
import yaml
from diffdistill.trainers import load_run_config
from diffdistill.trainers.pretrain import PretrainConfig

from diffdistill.config import (
    BaseConfig,
    ConfigError,
    build_config,
    deep_merge,
    load_yaml,
    parse_overrides,
    save_config,
)


def test_overrides_parse_and_types():
    ov = parse_overrides(["train.lr=1e-5", "adapter.type=lora", "train.max_steps=20",
                          "eval.steps=[1,2,4]", "model.prediction_type=null"])
    cfg = build_config(BaseConfig, deep_merge({"method": "x"}, ov))
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.type == "lora" and cfg.train.max_steps == 20
    assert cfg.eval.steps == [1, 2, 4] and cfg.model.prediction_type is None


def test_overrides_index_into_lists():
    base = {"models": [{"name": "a", "steps": [1, 2]}, {"name": "b", "steps": [4]}], "n": 3}
    out = deep_merge(base, parse_overrides(["models.1.steps=[50]", "models.0.name=z"]))
    assert out == {"models": [{"name": "z", "steps": [1, 2]}, {"name": "b", "steps": [50]}],
                   "n": 3}
    assert base["models"][1]["steps"] == [4]  # the base is not modified
    assert deep_merge(base, parse_overrides(["models=[]"]))["models"] == []  # whole list
    with pytest.raises(ConfigError, match="models has only 2 entries"):
        deep_merge(base, parse_overrides(["models.2.steps=[1]"]))
    with pytest.raises(ConfigError, match="models is a list; index its entries as models.0"):
        deep_merge(base, parse_overrides(["models.first.steps=[1]"]))


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        build_config(BaseConfig, {"train": {"lrr": 1e-4}})
    msg = str(e.value)
    assert "train.lrr" in msg and "lr" in msg and "max_steps" in msg
    with pytest.raises(ConfigError, match="unknown config key 'foo'"):
        build_config(BaseConfig, {"foo": 1})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"max_steps": "ten"}}, "train.max_steps"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
        ({"adapter": {"type": "dora"}}, "adapter.type"),
        ({"train": {"max_steps": 2.5}}, "train.max_steps"),
        ({"train": {"max_steps": True}}, "train.max_steps"),
        ({"model": "path"}, "model"),
        ({"log": {"tensorboard": "maybe"}}, "log.tensorboard"),
    ],
)
def test_wrong_type_names_key(data, key):
    with pytest.raises(ConfigError) as e:
        build_config(BaseConfig, data)
    assert key in str(e.value)


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        build_config(BaseConfig, {"train": {"mixed_precision": "fp8"}})
    assert "'no'" in str(e.value) and "'bf16'" in str(e.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"adapter": {"type": "lora", "rank": 0}}, "adapter.rank"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
        ({"train": {"grad_accum": 0}}, "train.grad_accum"),
    ],
)
def test_impossible_values(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(BaseConfig, data)


def test_method_section_and_combination():
    cfg = build_config(PretrainConfig, {"method": "pretrain", "pretrain": {"cond_dropout": 0.2}})
    assert cfg.pretrain.cond_dropout == 0.2
    with pytest.raises(ConfigError, match="adapter.type=full"):
        build_config(PretrainConfig, {"method": "pretrain", "adapter": {"type": "lora"}})


def test_yaml_base_inheritance_and_round_trip(tmp_path):
    (tmp_path / "parent.yaml").write_text("method: pretrain\ntrain:\n  lr: 0.001\n  max_steps: 7\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  max_steps: 9\n")
    cls, cfg = load_run_config(tmp_path / "child.yaml", ["seed=3"])
    assert cls.__name__ == "PretrainTrainer"
    assert (cfg.train.lr, cfg.train.max_steps, cfg.seed) == (0.001, 9, 3)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = build_config(PretrainConfig, yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()))
    assert again == cfg


def test_missing_method_and_unknown_method(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="method"):
        load_run_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="pretrain"):
        load_run_config(tmp_path / "a.yaml", ["method=dmd3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.lr"])


def test_wandb_requested_but_missing_fails_early(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="log.wandb"):
        build_config(BaseConfig, {"log": {"wandb": True}})


def test_pyproject_ships_every_config_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["diffdistill.configs"] == "configs"
    folders = {"diffdistill.configs." + d.name for d in (root / "configs").iterdir()
               if d.is_dir() and not d.name.startswith((".", "__"))}
    assert folders and folders <= set(setup["packages"]), sorted(folders - set(setup["packages"]))


def test_configs_are_found_by_their_packaged_name(tmp_path, monkeypatch):
    from diffdistill.config import ConfigError, find_config, packaged_config_dir

    monkeypatch.chdir(tmp_path)  # outside the repository: only the packaged copy exists
    assert find_config("lcd/toy_lora.yaml") == packaged_config_dir() / "lcd" / "toy_lora.yaml"
    assert find_config("configs/dmd2/toy.yaml") == packaged_config_dir() / "dmd2" / "toy.yaml"
    (tmp_path / "mine.yaml").write_text("method: dmd2\n")
    assert find_config("mine.yaml") == Path("mine.yaml")  # a real file wins
    with pytest.raises(ConfigError, match="nope/x.yaml does not exist"):
        find_config("nope/x.yaml")


def test_an_installed_wheel_runs_the_demo_outside_the_repository(tmp_path):
    """pip installs the wheel (no editable source tree) into a folder; from another folder,
    `diffdistill demo --smoke` finds its configs and world inside the installed package."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(root)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "diffdistill" / "configs" / "dmd2" / "toy.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import diffdistill, sys; from diffdistill.cli import main; "
            f"assert diffdistill.__file__.startswith({str(target)!r}), diffdistill.__file__; "
            "sys.exit(main(['demo', '--smoke', '--methods', 'dmd2', '--no-teachers', "
            "'--num-samples', '8', '--out', 'demo']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    assert (work / "demo" / "report.html").is_file()
    assert "configs/dmd2/toy.yaml" in run.stdout
