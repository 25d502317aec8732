"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A run is described by one YAML file whose ``method`` key picks the trainer (and with it the
config class), plus ``key.sub=value`` overrides. Everything is validated *before* any model
loads: an unknown key, a wrong type or an impossible combination raises :class:`ConfigError`
whose message names the dotted key and what is allowed. The resolved config is written into
the run folder (``config.yaml``) so every run can be reproduced.

Public contract (scripts and docs rely on these names): ``model.path``, ``output_dir``,
``seed``, ``train.max_steps``, ``train.batch_size``, ``train.lr``, ``train.grad_accum``,
``train.mixed_precision``, ``train.checkpoint_every``, ``adapter.type``, ``adapter.rank``,
``adapter.alpha``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


def torch_dtype(name: str):
    """A config's dtype name (``model.frozen_dtype``, a bench's ``dtype``: ``"fp32"`` /
    ``"fp16"`` / ``"bf16"``) → the torch dtype (imported here: reading a config needs no
    torch)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = ""  # local diffusers folder of the teacher / base model
    kind: Literal["auto", "sd", "sdxl", "pixel"] = "auto"
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = None  # override
    frozen_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of frozen networks
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    kind: Literal["fashion_mnist", "imagefolder", "classfolder", "prompts", "webdataset"] = (
        "fashion_mnist"
    )
    path: str = ""  # folder / file / shard pattern; fashion_mnist: optional IDX folder
    resolution: int = 32
    center_crop: bool = True
    random_flip: bool = False
    caption_key: str = "text"
    limit: Optional[int] = None  # use only the first N items
    num_workers: int = 0
    # cache VAE latents / prompt embeddings here, keyed by what the text encoders / the VAE
    # compute on fixed probes (and the data settings): new weights at the same path start
    # a new cache
    cache_dir: Optional[str] = None
    shuffle_shards: bool = False  # webdataset: a new shard order every epoch (seed, epoch)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # per process
    lr: float = 1e-4
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 500  # 0 disables periodic checkpoints
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 disables the evaluation EMA
    ema_warmup: bool = False  # evaluation EMA decay min(ema_decay, n/(n+9)) at update n
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before stopping
    cpu: bool = False  # force CPU even when CUDA is present
    compile: bool = False  # torch.compile every network the trainer runs (trainers/compiling.py)


@dataclass
class AdapterConfig:
    type: Literal["lora", "full"] = "full"
    rank: int = 64
    alpha: Optional[float] = None  # None: alpha = rank
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )
    conv: bool = False
    ff: bool = False


@dataclass
class EvalConfig:
    every: int = 0  # quick metric every N steps (0: off)
    num_samples: int = 256
    steps: list[int] = field(default_factory=lambda: [1, 4])
    guidance_scale: float = 1.0
    detector: str = "fmnist-net"  # feature network (diffdistill.eval.features registry)
    # what the periodic metric (and so the choice of a checkpoint) is measured against:
    # the validation images; fashion_mnist_test, a folder of images, or a FeatureStats .npz
    reference: str = "fashion_mnist_val"
    # also improved precision / recall (k = 3) of the samples against the first num_samples
    # reference images: eval/precision_<N>step, eval/recall_<N>step (fidelity / diversity)
    precision_recall: bool = False


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    grid_every: int = 0  # PNG grid of samples from fixed seeds every N steps (0: off)
    grid_size: int = 16
    grid_steps: int = 4
    heartbeat_s: float = 0.0  # >0: a "[name] step k/N, it/s, ETA" line this often (no bar)
    name: str = ""  # the run's label in heartbeat lines (default: the method)


@dataclass
class BaseConfig:
    method: str = ""
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Cross-field checks shared by every method; subclasses extend and call super()."""
        t = self.train
        _positive(t.max_steps, "train.max_steps")
        _positive(t.batch_size, "train.batch_size")
        _positive(t.grad_accum, "train.grad_accum")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if t.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every must be >= 0 (0 disables checkpoints)")
        if t.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints must be >= 1")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if self.adapter.type == "lora":
            if self.adapter.rank <= 0:
                raise ConfigError(f"adapter.rank must be > 0 for adapter.type=lora, got "
                                  f"{self.adapter.rank}")
            if not self.adapter.target_modules:
                raise ConfigError("adapter.target_modules is empty for adapter.type=lora")
        _positive(self.data.resolution, "data.resolution")
        if self.data.cache_dir and self.data.random_flip:
            raise ConfigError("data.cache_dir caches one latent per image, which a random "
                              "flip would invalidate: set data.random_flip=false or drop "
                              "data.cache_dir")
        if self.data.shuffle_shards and self.data.kind != "webdataset":
            raise ConfigError(f"data.shuffle_shards is for data.kind=webdataset, not "
                              f"{self.data.kind!r} (map-style data is reshuffled every epoch)")
        if (self.data.cache_dir and not self.data.center_crop
                and self.data.kind in ("imagefolder", "classfolder", "webdataset")):
            raise ConfigError("data.cache_dir caches one latent per image, which a random "
                              "crop (data.center_crop=false: a new crop every epoch) would "
                              "invalidate: set data.center_crop=true or drop data.cache_dir")
        if self.log.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("log.wandb=true but the wandb package is not installed "
                                  "(pip install wandb), or set log.wandb=false")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if self.eval.precision_recall and self.eval.reference.endswith(".npz"):
            raise ConfigError("eval.precision_recall needs reference images (fashion_mnist_val, "
                              "fashion_mnist_test or a folder), not a statistics file: set "
                              "eval.reference or eval.precision_recall=false")


def _positive(v: int, key: str) -> None:
    if v <= 0:
        raise ConfigError(f"{key} must be > 0, got {v}")


# ----------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check (and for strings from the command line, convert) ``value`` against ``tp``."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-5", "adapter.type=lora"]`` → nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, new: dict) -> dict:
    """``new`` over ``base``, recursively. A mapping with integer keys over a list merges into
    the list's elements (the override ``models.0.steps=[50]`` changes the first model only)."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), list) and v:
            out[k] = _merge_into_list(k, out[k], v)
        else:
            out[k] = v
    return out


def _merge_into_list(key: str, items: list, new: dict) -> list:
    items = list(items)
    for i, v in new.items():
        if not str(i).isdigit():
            raise ConfigError(f"{key}.{i}: {key} is a list; index its entries as {key}.0, "
                              f"{key}.1, ...")
        j = int(i)
        if j >= len(items):
            raise ConfigError(f"{key}.{j}: {key} has only {len(items)} entries")
        items[j] = (deep_merge(items[j], v) if isinstance(v, dict) and isinstance(items[j], dict)
                    else v)
    return items


def packaged_config_dir() -> Path:
    """The run configs that ship with the package (the repository's ``configs/``, installed
    as ``diffdistill.configs``)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdistill.configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the packaged configs (diffdistill.configs) are missing: reinstall "
                          "diffdistill")
    return Path(next(iter(spec.submodule_search_locations)))


def find_config(name: str | os.PathLike) -> Path:
    """A config path as given, else the packaged config of that relative name
    (``lcd/toy_lora.yaml``, also ``configs/lcd/toy_lora.yaml``)."""
    p = Path(name)
    if p.exists():
        return p
    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    packaged = packaged_config_dir() / rel
    if not p.is_absolute() and packaged.is_file():
        return packaged
    raise ConfigError(f"config file {name} does not exist (neither here nor among the packaged "
                      f"configs in {packaged_config_dir()}, e.g. dmd2/toy.yaml)")


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    # `base: other.yaml` lets a config extend another (paths relative to this file)
    if "base" in data:
        parent = load_yaml(p.parent / data.pop("base"))
        data = deep_merge(parent, data)
    return data


def build_config(cls, data: dict):
    """Validate a plain dict into ``cls`` (a BaseConfig subclass) and run its checks."""
    cfg = _build(cls, data)
    cfg.validate()
    return cfg


def save_config(cfg, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
