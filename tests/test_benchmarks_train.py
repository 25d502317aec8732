"""benchmarks/train_step.py and benchmarks/train_memory.py on tiny settings (CPU, batch 2,
64 images): the hooks count exactly the network calls a known step makes (LCD full: the VAE
encode, the student, the teacher's one batched CFG call, the θ⁻ target; LCM-LoRA: the same
UNet three times), only outermost calls and no forward inside a backward, the floor is the
sum of its parts and below the step, the instrumentation does not change training, and the
memory figures are exact parameter / optimizer-state bytes, LoRA below full."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """A script of benchmarks/ as a module (train_memory imports train_step by name)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


train_step = _benchmark("train_step")
train_memory = _benchmark("train_memory")
TINY = ("data.limit=64",)
MB = 2**20


# ----------------------------------------------------------------------------- hooks


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class _Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.inner(x))


class _FakeTrainer:
    """Just what StepRecorder touches: networks as attributes, optimizers, an accelerator
    with clip_grad_norm_, update_emas and train_iteration."""

    def __init__(self):
        self.inner = _Inner()
        self.outer = _Outer(self.inner)  # runs `inner` inside its own forward
        params = list(self.outer.parameters())
        self.optimizers = {"net": torch.optim.SGD(params, lr=0.1)}
        self.accelerator = SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
        self.params = params
        self.emas_updated = 0

    def update_emas(self):
        self.emas_updated += 1

    def train_iteration(self, batches):
        x = next(batches)
        y = self.outer(x) + self.inner(x)  # outer (inner nested) + one direct inner call
        y.square().mean().backward()
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizers["net"].step()
        self.optimizers["net"].zero_grad()
        self.update_emas()
        return {}


def test_recorder_counts_outermost_calls_and_restores_everything():
    tr = _FakeTrainer()
    nets = {path for path, _ in train_step.find_networks(tr).values()}
    assert nets == {"inner", "outer"}
    batches = iter([torch.randn(3, 4) for _ in range(2)])
    backward, grad = torch.autograd.backward, torch.autograd.grad
    with train_step.StepRecorder(tr) as rec:
        s = rec.step(batches)
    # the nested inner call is inside outer's span; the backward runs no counted forward
    assert s["forward_calls"] == {"outer": 1, "inner": 1}
    assert (s["backward_calls"], s["optimizer_steps"], s["clip_calls"]) == (1, 1, 1)
    assert tr.emas_updated == 1 and s["ema_ms"] > 0 and s["data_ms"] > 0
    assert s["floor_ms"] == pytest.approx(s["forward_ms"] + s["backward_ms"]
                                          + s["optimizer_ms"], rel=1e-12)
    assert s["forward_ms"] == pytest.approx(sum(s["forward_ms_by_network"].values()), rel=1e-12)
    assert 0 < s["floor_ms"] <= s["step_ms"]
    assert s["step_ms"] == pytest.approx(s["floor_ms"] + s["data_ms"] + s["ema_ms"]
                                         + s["other_ms"], rel=1e-9)
    # hooks and patches are gone afterwards
    assert torch.autograd.backward is backward and torch.autograd.grad is grad
    assert "update_emas" not in vars(tr)
    assert tr.accelerator.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
    assert not tr.outer._forward_pre_hooks and not tr.inner._forward_hooks
    assert not tr.optimizers["net"]._optimizer_step_pre_hooks


# ----------------------------------------------------------------------------- LCD step


@pytest.fixture(scope="module")
def lcd_pair(tmp_path_factory):
    """Two identical LCD-full trainers (toy config, world teacher, batch 2, 64 images)."""
    root = tmp_path_factory.mktemp("lcd")
    return [train_step.build_trainer(train_step.CASES["lcd"], root / name, "cpu", 2,
                                     extra=TINY) for name in ("a", "b")]


def test_lcd_step_counts_its_network_calls_and_changes_nothing(lcd_pair):
    (tr_a, batches_a), (tr_b, batches_b) = lcd_pair
    tr_a.train_iteration(batches_a)
    tr_b.train_iteration(batches_b)
    with train_step.StepRecorder(tr_a) as rec:
        s = rec.step(batches_a)
    tr_b.train_iteration(batches_b)
    # the recorded step trained exactly as the plain one
    for p, q in zip(tr_a.unwrap(tr_a.unet).parameters(), tr_b.unwrap(tr_b.unet).parameters()):
        assert torch.equal(p, q)
    calls = dict(s["forward_calls"])
    assert calls.pop("backbone.text_encoder", 0) <= 1  # prompt-cache misses only
    # VAE encode; student f_θ(x_{t_{n+k}}); teacher CFG (cond + uncond in one call); θ⁻
    assert calls == {"backbone.vae": 1, "unet": 1, "backbone.unet": 1,
                     "target.denoiser.unet": 1}
    assert tr_a.unwrap(tr_a.unet) is not tr_a.backbone.unet  # three distinct UNets
    assert (s["backward_calls"], s["optimizer_steps"], s["clip_calls"]) == (1, 1, 1)
    assert min(s["forward_ms_by_network"][k] for k in calls) > 0
    assert s["backward_ms"] > 0 and s["optimizer_ms"] > 0 and s["ema_ms"] > 0
    assert 0 < s["floor_ms"] <= s["step_ms"]
    assert s["floor_ms"] == pytest.approx(s["forward_ms"] + s["backward_ms"]
                                          + s["optimizer_ms"], rel=1e-12)


def test_run_interleaves_and_reports_lcm_lora(tmp_path):
    logs = []
    (res,) = train_step.run(["lcd-lora"], rounds=2, steps=2, warmup=1, batch=2, extra=TINY,
                            out_root=str(tmp_path), log=logs.append)
    assert len(res.rounds) == 2 and len(res.steps) == 4
    for s in res.steps:
        calls = dict(s["forward_calls"])
        calls.pop("backbone.text_encoder", None)
        # one UNet object: student, teacher (adapters disabled) and θ⁻ (online weights)
        assert calls == {"backbone.vae": 1, "unet": 3}
        assert 0 < s["floor_ms"] <= s["step_ms"]
    summ = res.summary()
    assert summ["adapter"] == "lora" and summ["batch"] == 2
    assert summ["step_over_floor"] >= 1.0
    # a round is the mean of its steps; the summary the median of the rounds
    assert res.rounds[0]["step_ms"] == pytest.approx((res.steps[0]["step_ms"]
                                                      + res.steps[1]["step_ms"]) / 2)
    assert summ["step_ms"] == pytest.approx((res.rounds[0]["step_ms"]
                                             + res.rounds[1]["step_ms"]) / 2)
    row = train_step.table([res]).splitlines()[-1]
    assert row.startswith("| lcd-lora | lora | 2 |") and "unet×3" in row


def test_compile_rows_pair_each_compiled_case_with_its_eager_twin():
    R = train_step.Result
    eager = R("lcd-lora", "c", "lora", 32, rounds=[{"step_ms": 100.0}, {"step_ms": 120.0}],
              warmup_s=[0.1, 0.1], losses=[{"loss": 1.0}, {"loss": 0.5}, {"loss": 0.25}])
    comp = R("lcd-lora+compile", "c", "lora", 32,
             rounds=[{"step_ms": 70.0}, {"step_ms": 96.0}], warmup_s=[60.0, 0.08],
             losses=[{"loss": 1.0}, {"loss": 0.5 * (1 + 2e-6)}, {"loss": 0.25 * (1 + 1e-3)}])
    (row,) = train_step.compile_rows([eager, comp])
    assert row["case"] == "lcd-lora"
    assert row["eager_step_ms"] == 110.0 and row["compiled_step_ms"] == 83.0
    assert row["compiled_over_eager"] == pytest.approx((0.7 + 0.8) / 2)  # per-round ratios
    assert row["compile_s"] == pytest.approx(60.08 - 2 * 0.083)
    assert row["loss_drift_warmup"] == pytest.approx(2e-6)  # the first two iterations
    assert row["loss_drift_all"] == pytest.approx(1e-3)
    line = train_step.compile_table([row]).splitlines()[-1]
    assert line.startswith("| lcd-lora | lora | 32 | 110.0 | 83.0 | **0.75** | 60 |")
    assert train_step.table([comp]).count("\n") == 1  # header only: no floor without hooks


# ----------------------------------------------------------------------------- memory


def test_memory_is_exact_and_lora_is_smaller(lcd_pair):
    rows = {r["case"]: r for r in train_memory.measure(["lcd-full", "lcd-lora"], batch=2,
                                                        extra=TINY)}
    full, lora = rows["lcd-full"], rows["lcd-lora"]
    tr = lcd_pair[1][0]  # the same config built in this process
    nets = [tr.backbone.unet, tr.unwrap(tr.unet), tr.target.denoiser.unet, tr.backbone.vae,
            tr.backbone.text_encoder]
    unique = {p.data_ptr(): p for m in nets for p in m.parameters()}
    assert {p.dtype for p in unique.values()} == {torch.float32}
    assert full["params_mb"] * MB == sum(p.numel() * 4 for p in unique.values())
    student = sum(p.numel() * 4 for p in tr.unwrap(tr.unet).parameters())
    assert full["trainable_mb"] * MB == student
    assert full["optimizer_state_mb"] == 2 * full["trainable_mb"]  # AdamW: two moments
    assert full["ema_mb"] == 0  # θ⁻ *is* the EMA: counted once, as the target's weights
    # LoRA: one UNet (+ adapter) instead of teacher + student + θ⁻
    assert 0 < lora["trainable_mb"] < full["trainable_mb"]
    assert lora["optimizer_state_mb"] == 2 * lora["trainable_mb"]
    assert lora["params_mb"] * MB == (full["params_mb"] - 2 * full["trainable_mb"]
                                      + lora["trainable_mb"]) * MB
    for r in (full, lora):
        assert r["build_mb"] > 0 and r["peak_mb"] >= r["build_mb"]
        assert r["step_peak_mb"] == pytest.approx(r["peak_mb"] - r["build_mb"])
    assert train_memory.table([full, lora]).count("| lcd-") == 2


# ----------------------------------------------------------------------------- the fixes


def test_ema_update_is_the_per_tensor_lerp():
    """EMA.update (one multi-tensor lerp) gives bit for bit what a lerp_ per tensor gives."""
    from diffdistill.trainers.ema import EMA

    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet().requires_grad_(True)
    unet.conv_in.requires_grad_(False)  # frozen parameters have no shadow
    ema = EMA(unet, decay=0.95)
    ref = {n: t.clone() for n, t in ema.shadow.items()}
    for k in range(3):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        params = dict(unet.named_parameters())
        for n, shadow in ref.items():
            shadow.lerp_(params[n].detach().float(), 1.0 - (0.9 if k == 2 else 0.95))
        ema.update(unet, decay=0.9 if k == 2 else None)
    assert "conv_in.weight" not in ema.shadow and len(ema.shadow) == len(ref) > 100
    assert all(torch.equal(ema.shadow[n], ref[n]) for n in ref)
    assert any(not torch.equal(ref[n], params[n]) for n in ref)  # it did not just copy


def test_adapters_disabled_switches_every_lora_layer_like_diffusers():
    """One walk over the modules, the peft layers' own switch: inside the block every LoRA
    layer is off and its weights frozen (diffusers' disable_adapters), after it all are back
    on and trainable (enable_adapters); a block entered disabled stays disabled."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from diffdistill.adapters import adapters_disabled, make_trainable
    from diffdistill.tiny import tiny_cond_unet

    unet = tiny_cond_unet()
    lora = make_trainable(unet, rank=2, conv=True, ff=True)
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) > 20
    with adapters_disabled(unet):
        assert all(m.disable_adapters for m in layers)
        assert not any(p.requires_grad for p in lora)
    assert not any(m.disable_adapters for m in layers)
    assert all(p.requires_grad for p in lora)
    unet.disable_adapters()
    with adapters_disabled(unet):
        pass
    assert all(m.disable_adapters for m in layers)


def test_class_confusion_counts_what_the_classifier_sees(pixel_dir, capsys, tmp_path):
    """The probe's matrix has one row per class asked for (sample i asks for i % 10), its
    agreement is the matrix's trace over the sample count, and the grid is written."""
    import json

    probe = _benchmark("class_confusion")
    assert probe.main([str(pixel_dir), "--steps", "1", "--num", "20",
                       "--grid", str(tmp_path / "g.png")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    confusion = torch.tensor(out["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum(dim=1).tolist() == [2] * 10
    assert out["agreement"] == pytest.approx(confusion.trace().item() / 20)
    assert (tmp_path / "g.png").is_file()
