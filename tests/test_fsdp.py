"""What the trainers do under FSDP, checked in one process with ``Trainer._is_fsdp`` patched to
say yes (tests/test_fsdp2_cpu.py launches real FSDP2 on two CPU processes; the GPU check's
``fsdp_launch`` stage runs it on a GPU):

* configurations that read a trained network outside its FSDP wrapper are refused before
  any model loads, each with a message naming the key;
* the final export goes through the gathered full state dict and an unsharded rebuild, and
  gives exactly the weights of the normal export.
"""

from __future__ import annotations

import pytest
import torch
from diffdistill.trainers.base import Trainer
from diffdistill.trainers.common import unsharded_rebuild
from diffdistill.trainers.dmd2 import DMD2Trainer
from diffdistill.trainers.fdistill import FDistillTrainer
from diffdistill.trainers.hypersd import HyperSDTrainer
from diffdistill.trainers.lcd import LCDTrainer
from helpers import tiny_run_data
from safetensors.torch import load_file

from diffdistill.config import ConfigError, build_config, deep_merge


@pytest.fixture
def fsdp(monkeypatch):
    monkeypatch.setattr(Trainer, "_is_fsdp", lambda self: True)


def _trainer(cls, model_dir, out, **over):
    data = deep_merge(tiny_run_data(cls.method, model_dir, out, 32), over)
    return cls(build_config(cls.config_class, data))


@pytest.mark.parametrize("cls, over, key", [
    (DMD2Trainer, {"adapter": {"type": "lora"}}, "adapter.type=lora"),
    (DMD2Trainer, {"train": {"ema_decay": 0.99}}, "train.ema_decay=0.99"),
    (DMD2Trainer, {"log": {"grid_every": 5}}, "log.grid_every"),
    (DMD2Trainer, {"eval": {"every": 5}}, "eval.every"),
    (LCDTrainer, {}, "full-weight LCD keeps θ⁻"),
    (HyperSDTrainer, {}, "Hyper-SD keeps θ⁻"),
    (FDistillTrainer, {"fdistill": {"r1_gamma": 1.0}}, "fdistill.r1_gamma=1.0"),
])
def test_refused_under_fsdp_with_the_reason(fsdp, sd_dir, tmp_path, cls, over, key):
    with pytest.raises(ConfigError) as e:
        _trainer(cls, sd_dir, tmp_path / "run", **over)
    msg = str(e.value)
    assert msg.startswith("not supported under FSDP") and key in msg, msg
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_same_configs_are_accepted_without_fsdp(sd_dir, tmp_path):
    lcd = _trainer(LCDTrainer, sd_dir, tmp_path / "a")
    dmd2 = _trainer(DMD2Trainer, sd_dir, tmp_path / "b", train={"ema_decay": 0.99})
    for tr, run in ((lcd, "a"), (dmd2, "b")):
        assert not tr._is_fsdp()
        assert tr._check_fsdp() is None  # nothing refused ...
        tr.setup()  # ... and the networks build
        assert tr.networks and (tmp_path / run / "config.yaml").is_file()


def test_unsharded_rebuild_is_an_exact_plain_copy(sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the from_pretrained weights
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    new = unsharded_rebuild(unet, state)
    assert type(new) is UNet2DConditionModel and new is not unet
    assert not any(p.is_meta for p in new.parameters())
    for k, v in new.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(new(x, 500, ehs).sample, unet(x, 500, ehs).sample)
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="Missing key"):
        unsharded_rebuild(unet, state)


def test_export_under_fsdp_gathers_and_matches_the_plain_export(sd_dir, tmp_path, monkeypatch):
    plain = _trainer(DMD2Trainer, sd_dir, tmp_path / "plain")
    plain.fit()
    gathered = []
    real = plain.accelerator.get_state_dict

    monkeypatch.setattr(Trainer, "_is_fsdp", lambda self: True)
    fsdp = _trainer(DMD2Trainer, sd_dir, tmp_path / "fsdp")
    monkeypatch.setattr(fsdp.accelerator, "get_state_dict",
                        lambda m: gathered.append(m) or real(m))
    import diffdistill.trainers.common as common

    rebuilt = []
    monkeypatch.setattr(common, "unsharded_rebuild",
                        lambda m, sd, _real=common.unsharded_rebuild: rebuilt.append(m)
                        or _real(m, sd))
    fsdp.fit()
    assert len(rebuilt) == 1  # the generator export went through the gathered weights
    # every trained network was gathered (generator and fake score), on this (only) rank
    assert len(gathered) == len(fsdp.networks) >= 2
    a = load_file(str(tmp_path / "plain/export/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp/export/unet/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_side_passes_keep_the_fsdp_wrapper_and_drop_ddp():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    tr = Trainer.__new__(Trainer)
    prepared = SimpleNamespace(inner=object())
    tr.accelerator = SimpleNamespace(unwrap_model=lambda m: m.inner,
                                     distributed_type=DistributedType.FSDP)
    assert tr.side_pass(prepared) is prepared  # FSDP: its units must gather / cast
    for other in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED, DistributedType.NO):
        tr.accelerator.distributed_type = other
        assert tr.side_pass(prepared) is prepared.inner  # no gradient reduction to wait for


def test_dmd2_generator_step_runs_the_fake_score_as_a_side_pass(fsdp, sd_dir, tmp_path,
                                                                 monkeypatch):
    tr = _trainer(DMD2Trainer, sd_dir, tmp_path / "run", train={"max_steps": 1})
    seen = []
    real = Trainer.side_pass
    monkeypatch.setattr(Trainer, "side_pass", lambda self, m: seen.append(m) or real(self, m))
    tr.fit()
    assert any(m is tr.fake_score for m in seen)  # the generator step's frozen pass
