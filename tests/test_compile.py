"""``train.compile``: what gets compiled, and a compiled run equal to the eager one.

The equality run trains the tiny SD fixture for two steps with everything that changes a
compiled network's guards on the way (see the test's docstring)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffdistill.trainers import get_trainer_class
from diffdistill.trainers.compiling import compile_networks, compile_targets, is_compiled
from helpers import method_run_data
from torch import nn

from diffdistill.config import ConfigError, build_config, deep_merge


class _VAE(nn.Module):
    """Runs through encode / decode, like AutoencoderKL."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(2, 2), nn.Linear(2, 2)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


def test_compile_targets_skip_text_encoders_and_split_the_vae():
    vae = _VAE()
    assert compile_targets("backbone.vae", vae) == [("backbone.vae.encoder", vae.encoder),
                                                    ("backbone.vae.decoder", vae.decoder)]
    assert compile_targets("backbone.text_encoder_2", nn.Linear(2, 2)) == []
    lin = nn.Linear(2, 2)
    assert compile_targets("fake_score", lin) == [("fake_score", lin)]
    reward = SimpleNamespace(compile_parts=lambda: [("model.visual", lin)])
    assert compile_targets("reward_model", reward) == [("reward_model.model.visual", lin)]


def test_compile_networks_compiles_each_module_once_inside_its_wrapper():
    inner = nn.Linear(2, 2)
    wrapper = nn.Sequential(inner)  # stands in for DDP: the unwrapped module is compiled
    vae = _VAE()
    trainer = SimpleNamespace(student=wrapper, same=wrapper, text_encoder=nn.Linear(2, 2),
                              helper=SimpleNamespace(vae=vae))
    # the helper namespace is not a diffdistill object, so it is not searched: only direct
    # attributes count here
    done = compile_networks(trainer, unwrap=lambda m: m[0] if m is wrapper else m)
    assert done == ["same"] or done == ["student"]  # one module, reached twice
    assert is_compiled(inner) and not is_compiled(wrapper)
    assert not is_compiled(trainer.text_encoder) and not is_compiled(vae.encoder)
    x = torch.randn(3, 2)
    assert torch.allclose(inner(x), x @ inner.weight.T + inner.bias, atol=1e-6)


def test_compile_is_refused_under_fsdp_before_any_network_loads(pixel_dir, tmp_path,
                                                                monkeypatch):
    cls = get_trainer_class("pretrain")
    cfg = build_config(cls.config_class, method_run_data(
        "pretrain", pixel_dir, tmp_path, steps=1, train={"compile": True}))
    tr = cls(cfg)
    monkeypatch.setattr(type(tr), "_is_fsdp", lambda self: True)
    monkeypatch.setattr(type(tr), "make_dataset", lambda self: pytest.fail("loaded data"))
    with pytest.raises(ConfigError, match="train.compile=true under FSDP"):
        tr.setup()


def _run(method, model_dir, out, compile_, **sections):
    cls = get_trainer_class(method)
    data = method_run_data(method, model_dir, out, steps=2, **sections)
    data = deep_merge(data, {"train": {"compile": compile_, "checkpoint_every": 0},
                             "log": {"grid_every": 2, "grid_size": 3, "grid_steps": 1}})
    tr = cls(build_config(cls.config_class, data))
    initial = {}

    def keep_initial(self=tr, build=tr.build):
        build()
        initial.update({name: [p.detach().clone() for p in params]
                        for name, params in self.trainable.items()})

    tr.build = keep_initial
    tr.fit()
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {name: [p.detach().clone() for p in params]
               for name, params in tr.trainable.items()}
    return tr, logs, weights, initial


def test_compiled_lcm_lora_run_equals_the_eager_run(sd_dir, tmp_path):
    """LCM-LoRA: one UNet in three roles (student; teacher with the LoRA off, on a CFG batch
    of twice the size; θ⁻ under no_grad), the VAE encoder, the EMA, and a grid of 3 samples
    in eval mode through the VAE decoder. The losses are the sharp check: a teacher pass
    that kept its LoRA on (planted once by hand) moves step 2's loss by 2 %, compiling
    moves it by 1e-5 %. (Every trainer's compiled losses against its eager
    ones at the world's scale: ``benchmarks/train_step.py --compile``.)"""
    sections = {"adapter": {"type": "lora", "rank": 4, "conv": True}, "lcd": {},
                # eps well above float noise: Adam would otherwise turn a near-zero gradient's
                # noise into a full ±lr step (its update is lr·m/(√v + eps))
                "train": {"adam_eps": 1e-4, "lr": 1e-2}}  # a LoRA far from zero by step 2
    eager, eager_logs, eager_w, eager_w0 = _run("lcd", sd_dir, tmp_path / "eager", False,
                                                **sections)
    comp, comp_logs, comp_w, _ = _run("lcd", sd_dir, tmp_path / "compiled", True, **sections)
    assert eager.compiled_networks == []
    assert sorted(comp.compiled_networks) == ["backbone.vae.decoder", "backbone.vae.encoder",
                                              "unet"]
    for name, module in comp.networks.items():  # compiled in place, inside any wrapper
        assert is_compiled(comp.unwrap(module)), name
    keys = [k for k in eager_logs[-1] if k.startswith(("loss", "grad_norm"))]
    assert keys and len(comp_logs) == len(eager_logs) == 2
    for a, b in zip(eager_logs, comp_logs):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for name in eager_w:
        # what training changed, compiled against eager, as one vector per network: the
        # compiled kernels sum in another order, and an element whose gradient is mostly
        # cancellation keeps few digits of it, so the elementwise error says little
        before = eager_w0[name]
        d_eager = torch.cat([(a - w).flatten() for a, w in zip(eager_w[name], before)])
        d_comp = torch.cat([(b - w).flatten() for b, w in zip(comp_w[name], before)])
        rel = float((d_comp - d_eager).norm() / d_eager.norm())
        print(f"{name}: |update difference| / |update| = {rel:.2e}")
        assert d_eager.norm() > 0 and rel < 5e-3, (name, rel)  # measured 1.5e-3
    grids = sorted((tmp_path / "compiled" / "samples").glob("*.png"))
    assert grids  # the eval-mode grid (3 samples, batch 2 in training) ran compiled
    assert (tmp_path / "compiled" / "export").exists()


def test_fdistill_r1_penalty_runs_under_compile(pixel_dir, tmp_path):
    """R1 differentiates twice through the fake score; a compiled backward is not
    differentiable, so the penalty's forward runs eagerly — the same value as in an eager run,
    while the rest of the step runs compiled (f-distill's whole loss and update compiled
    against eager at the world's scale: ``benchmarks/train_step.py --compile``)."""
    cls = get_trainer_class("fdistill")
    penalties = {}
    for compile_ in (False, True):
        data = method_run_data("fdistill", pixel_dir, tmp_path / str(compile_), steps=1,
                               train={"compile": compile_})
        tr = cls(build_config(cls.config_class, data))
        tr.setup()
        assert tr.compiled_networks == (["fake_score", "real_unet", "student"]
                                        if compile_ else [])
        tr.global_step = 1  # a fake-score-only step (TTUR 2: the generator updates on even)
        logs = tr.train_iteration(tr._batches())
        assert "loss_dm" not in logs
        penalties[compile_] = logs["loss_d_penalty"]
    assert penalties[False] > 0
    assert penalties[True] == pytest.approx(penalties[False], rel=1e-4)
