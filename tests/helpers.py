"""Helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations


def free_port() -> int:
    """A TCP port nobody listens on now: each 2-process launch gets its own, so launches in
    parallel test workers (``pytest -n``) never meet on a fixed port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_data(method: str, model_dir, out, res: int, **sections) -> dict:
    """A short CPU run on a tiny fixture model: the config dict every trainer test starts from."""
    from diffdistill.config import deep_merge

    data = {
        "method": method, "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "cpu": True},
        "adapter": {"type": "full", "rank": 4},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    return deep_merge(data, sections)


def shipped_config_on_tiny_model(config: str, model_dir, out, **sections) -> dict:
    """A shipped recipe (``configs/<config>``, written for a real checkpoint) pointed at a tiny
    fixture model for one CPU step on 8 Fashion-MNIST images: what its config test runs."""
    from pathlib import Path

    from diffdistill.config import deep_merge, load_yaml

    root = Path(__file__).resolve().parents[1]
    tiny = {"output_dir": str(out), "model": {"path": str(model_dir), "frozen_dtype": "fp32"},
            "data": {"kind": "fashion_mnist", "path": "", "resolution": 32, "limit": 8,
                     "num_workers": 0},
            "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "cpu": True,
                      "mixed_precision": "no"},
            "log": {"progress": False, "tensorboard": False, "grid_every": 0}}
    return deep_merge(deep_merge(load_yaml(root / "configs" / config), tiny), sections)


def stock_sd_pipeline(base_dir, scheduler_cls, lora_dir=None, weight_name=None):
    """A fresh stock StableDiffusionPipeline with ``scheduler_cls`` and optionally a LoRA."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if weight_name:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe


# ----------------------------------------------------------------------------- every trainer
#: The trainers the reliability tests (crash/resume, two processes) run, in registry order.
ALL_METHODS = ("pretrain", "ict", "lcd", "rglcd", "dmd2", "fdistill", "hypersd")
#: Methods that distil a latent SD-structured teacher (the others run on the pixel fixture).
LATENT_METHODS = frozenset({"lcd", "rglcd", "hypersd"})


def method_run_data(method: str, model_dir, out, *, steps: int, reward: dict | None = None,
                    stage_steps: int = 1, **sections) -> dict:
    """A tiny run of ``method`` that exercises its stateful parts: EMAs / θ⁻, the iCT
    curriculum and dropout, RG-LCD's latent reward model, DMD2 / f-distill's two time-scale
    rule (ratio > 1) with the GAN and multi-step backward simulation, f-distill's ratio bins
    and R1, and Hyper-SD's stages (TSCD → + reward → one-step + DM), each ``stage_steps``
    long. ``reward``: the reward section for rglcd / hypersd (a tiny CLIP in the tests)."""
    from diffdistill.config import deep_merge

    if method in ("rglcd", "hypersd") and reward is None:
        raise ValueError(f"{method} needs a reward section")
    latent = method in LATENT_METHODS
    per: dict = {"train": {"max_steps": steps, "ema_decay": 0.9}}
    if method == "ict":
        per["ict"] = {"init": "pretrained", "s0": 2, "s1": 16, "dropout": 0.1}
    elif method == "lcd":
        per["lcd"] = {"time_cond_proj_dim": 32}
    elif method == "rglcd":
        per.update(adapter={"type": "lora", "rank": 4, "conv": True},
                   lcd={"time_cond_proj_dim": 32}, rglcd={"mode": "lrm", "beta": 0.5},
                   reward=reward, lrm={"width": 16, "depth": 2})
    elif method in ("dmd2", "fdistill"):
        per["dmd2"] = {"fake_updates_per_generator_update": 3 if method == "dmd2" else 2,
                       "timesteps": [999, 499]}
        if method == "fdistill":
            per["fdistill"] = {"r1_gamma": 0.5}
    elif method == "hypersd":
        per.update(adapter={"type": "lora", "rank": 4, "conv": True}, hypersd={
            "stages": [{"segments": 4, "steps": stage_steps},
                       {"segments": 2, "steps": stage_steps, "reward": True},
                       {"segments": 1, "score_distill": True}],
            "w_min": 1.0, "w_max": 4.0,
            "score_distill": {"guidance_scale": 2.0, "fake_updates_per_generator_update": 2},
            "reward": {"weight": 0.5, "model": reward}})
    data = tiny_run_data(method, model_dir, out, 32 if latent else 16, **per)
    return deep_merge(data, sections)


def check_report_html(page, results_json) -> dict:
    """A report.html read as a person's browser would: parsed, every image decodes as an
    embedded PNG, every row of results.json is a table row (model, steps) on the page.
    Returns {"images": [alt, ...], "headings": [...]}."""
    import base64
    import json
    from html.parser import HTMLParser
    from pathlib import Path

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.rows, self.headings, self._row, self._cell = [], [], [], None, None
            self._h = None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.images.append(a)
            elif tag == "tr":
                self._row = []
            elif tag in ("td", "th") and self._row is not None:
                self._cell = ""
            elif tag in ("h1", "h2"):
                self._h = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self._cell is not None:
                self._row.append(self._cell.strip())
                self._cell = None
            elif tag == "tr" and self._row is not None:
                self.rows.append(self._row)
                self._row = None
            elif tag in ("h1", "h2") and self._h is not None:
                self.headings.append(self._h.strip())
                self._h = None

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data
            if self._h is not None:
                self._h += data

    p = Page()
    p.feed(Path(page).read_text(encoding="utf-8"))
    assert p.images, "no image on the page"
    for img in p.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r[0], r[1]) for r in p.rows if len(r) > 1}
    for r in json.loads(Path(results_json).read_text())["rows"]:
        assert (r["model"], str(r["steps"])) in rows, (r["model"], r["steps"])
    return {"images": [i.get("alt") for i in p.images], "headings": p.headings}


def assert_resume_is_bit_identical(method: str, model_dir, root, *, cut: int, total: int,
                                   **sections):
    """``method`` for ``cut`` steps then ``--resume latest`` to ``total`` ends with the
    checkpoint of an uninterrupted ``total``-step run: every safetensors file (weights,
    trainer tensors, RNG) and every optimizer state, tensor for tensor. Returns the
    uninterrupted run's checkpoint folder for further checks."""
    from pathlib import Path

    import torch
    from diffdistill.trainers import get_trainer_class
    from diffdistill.trainers.checkpointing import list_checkpoints
    from safetensors.torch import load_file

    from diffdistill.config import build_config, deep_merge

    cls = get_trainer_class(method)
    root = Path(root)

    def run(out, steps, resume=None):
        data = method_run_data(method, model_dir, out, steps=steps)
        data = deep_merge(data, deep_merge(
            {"train": {"checkpoint_every": 1, "keep_checkpoints": 1}}, sections))
        cls(build_config(cls.config_class, data)).fit(resume=resume)

    run(root / "ref", total)
    run(root / "cut", cut)
    run(root / "cut", total, resume="latest")
    ref, resumed = list_checkpoints(root / "ref")[-1], list_checkpoints(root / "cut")[-1]
    assert ref.name == resumed.name == f"checkpoint-{total}"
    for f in sorted(ref.glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(resumed / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    for f in sorted(ref.glob("optimizer*.bin")):
        a = torch.load(f, weights_only=True)["state"]
        b = torch.load(resumed / f.name, weights_only=True)["state"]
        assert a.keys() == b.keys() and all(
            torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]), f.name
    return ref


def run_model_card_code(export_dir, workdir, monkeypatch) -> None:
    """Run the diffusers code of an export's model card as written (in ``workdir``) and check
    that it wrote its ``sample.png``."""
    from pathlib import Path

    from diffdistill.export import card_code

    monkeypatch.chdir(workdir)
    exec(card_code(Path(export_dir) / "README.md"), {})
    assert (Path(workdir) / "sample.png").exists()


def randomize_lora_b(net, std: float = 0.2, seed: int = 1) -> None:
    """LoRA's B matrices start at zero (the adapter is a no-op): give them seeded values so
    that an export or a merge has something to carry."""
    import torch
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.normal_(0, std, generator=g)



def sigkill_and_resume(run_data, root, *, kill_after: int, total: int):
    """A run killed with SIGKILL once checkpoint ``kill_after`` exists (a separate
    ``diffdistill train`` process), resumed with ``--resume latest``, and the same run
    uninterrupted; ``run_data(out) -> dict`` is the run's config for output folder ``out``. Returns the final checkpoints ``(uninterrupted, resumed)`` for the caller to
    compare; fails if the run ended before the kill or was killed too late."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest
    import yaml
    from diffdistill.trainers.checkpointing import list_checkpoints

    from diffdistill.cli import main as cli

    def step_of(path) -> int:
        return int(path.name.rsplit("-", 1)[1])

    def write(out):
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(run_data(out)))
        return path

    out, ref = root / "crash", root / "ref"
    proc = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", "train", str(write(out))],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            done = list_checkpoints(out) if (out / "checkpoints").exists() else []
            if done and step_of(done[-1]) >= kill_after:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    killed_at = step_of(list_checkpoints(out)[-1])
    assert kill_after <= killed_at < total, "killed too late: slow the run down"
    assert cli(["train", str(write(out)), "--resume", "latest"]) == 0
    assert cli(["train", str(write(ref))]) == 0
    a, b = list_checkpoints(ref)[-1], list_checkpoints(out)[-1]
    assert a.name == b.name == f"checkpoint-{total}"
    return a, b
