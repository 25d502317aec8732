"""Every trainer, stopped by SIGTERM in the middle of step 2 (it finishes the step, writes
checkpoint-2 and exits 75), resumed with ``--resume latest`` in another process that is then
killed with SIGKILL after a few checkpoints (as close to a checkpoint write as the poll can
land), and resumed again, ends bit-identical to an uninterrupted run: every tensor of the
final checkpoint (weights, EMAs / θ⁻, method state tensors, RNG states, optimizer states),
the per-step logged values, and the method's phase (DMD2 / f-distill's two time-scale
counter, f-distill's ratio bins, Hyper-SD's stage, iCT's curriculum). A half-written
checkpoint is never "latest"; the lock the killed process left is taken over with a warning.

The killed run is a separate process; the SIGTERM-stopped run, the reference and the last
resumed run go through the same CLI entry point in this process (one thread, as the killed
process), which also shows the computation does not depend on the process it runs in. The
SIGTERM is a real signal (``os.kill`` of this process) sent from inside the step's update.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.run_guard import LOCK_NAME
from helpers import ALL_METHODS, LATENT_METHODS, method_run_data
from safetensors.torch import load_file
from standins import TINY_CLIP, make_tiny_clip

from diffdistill.cli import main as cli
from diffdistill.errors import STOPPED_EXIT_CODE

#: method -> (train.max_steps, kill once checkpoint-N exists)
PLAN = {"pretrain": (10, 4), "ict": (10, 5), "lcd": (8, 3), "rglcd": (8, 4), "dmd2": (10, 4),
        "fdistill": (10, 5), "hypersd": (10, 4)}
HYPERSD_STAGE_STEPS = 3  # stages 4 segments [0, 3), 2 + reward [3, 6), 1 + DM [6, 10)
STOP_STEP = 2  # SIGTERM arrives during this step (before every PLAN kill point)


@pytest.fixture(scope="module")
def reward_section(tmp_path_factory):
    cfg_file, weights, _ = make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return {"kind": "clip", "path": str(weights), "model_name": TINY_CLIP,
            "config_path": str(cfg_file)}


def write_run(tmp_path, method, model_dir, out, reward, steps, **over) -> Path:
    data = method_run_data(method, model_dir, out, steps=steps, reward=reward,
                           stage_steps=HYPERSD_STAGE_STEPS,
                           train={"checkpoint_every": 1, "keep_checkpoints": 2}, **over)
    cfg = tmp_path / f"{Path(out).name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def ckpt_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def kill_near_a_checkpoint(proc: subprocess.Popen, out: Path, after: int) -> bool:
    """SIGKILL ``proc`` once checkpoint-``after`` exists, preferably while the next checkpoint's
    temporary folder is being written. Returns whether a temporary folder was there."""
    root = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
        done = list_checkpoints(out)
        if done and ckpt_step(done[-1]) >= after:
            writing = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
            if writing or ckpt_step(done[-1]) > after:
                break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return any(p.name.startswith(".tmp-") for p in root.iterdir())


def rows_by_step(out: Path) -> dict[int, dict]:
    """Logged values per step; a step redone after the crash: the last row wins."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if k != "it_per_s"}
    return rows


def assert_same_safetensors(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not bad, f"{name}: {bad[:5]} differ"
    return names


def optimizer_states(ckpt: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True)
            for p in sorted(ckpt.glob("optimizer*.bin"))}


def assert_same_optimizers(a: Path, b: Path) -> dict[str, dict]:
    oa, ob = optimizer_states(a), optimizer_states(b)
    assert oa.keys() == ob.keys() and oa
    for name in oa:
        sa, sb = oa[name]["state"], ob[name]["state"]
        assert sa.keys() == sb.keys(), name
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (
                    name, i, k)
    return oa


def adam_steps(opt_state: dict) -> set[int]:
    return {int(s["step"]) for s in opt_state["state"].values()}


def phase(method: str, out: Path, ckpt: Path) -> dict:
    """The method's phase as seen from outside: what the logs and checkpoint say it did."""
    rows = rows_by_step(out)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(str(ckpt / "trainer_tensors.safetensors"))
    got = {"state": meta["state"], "global_step": meta["global_step"],
           "batches_consumed": meta["batches_consumed"],
           "ema": sorted({k.split(".")[1] for k in tensors if k.startswith("ema.")})}
    if method == "ict":
        got["num_scales"] = [rows[s]["num_scales"] for s in sorted(rows)]
    if method in ("dmd2", "fdistill"):
        opts = optimizer_states(ckpt)  # generator first, then fake score + GAN head
        got["generator_rows"] = [s for s in sorted(rows) if "loss_dm" in rows[s]]
        got["adam_steps"] = [sorted(adam_steps(opts[n])) for n in sorted(opts)]
    if method == "fdistill":
        from diffdistill.trainers.fdistill import FDistillTrainer as F

        got["bin_count"] = tensors[F.COUNT_KEY].tolist()
        got["bin_mean"] = tensors[F.MEAN_KEY].tolist()
    if method == "hypersd":
        got["segments"] = [rows[s]["segments"] for s in sorted(rows)]
        got["dm_rows"] = [s for s in sorted(rows) if "loss_dm" in rows[s]]
        got["reward_rows"] = [s for s in sorted(rows) if "reward" in rows[s]]
    if method == "rglcd":
        got["lrm_rows"] = [s for s in sorted(rows) if "loss_lrm" in rows[s]]
    return got


def expected_phase(method: str, steps: int) -> dict:
    """What each method's schedule prescribes for the PLAN runs (from its config)."""
    ema = {"pretrain": ["unet"], "ict": ["unet"], "lcd": ["target", "unet"],
           "rglcd": ["unet"], "dmd2": ["generator"], "fdistill": ["generator"],
           "hypersd": ["target", "unet"]}[method]
    exp = {"global_step": steps, "batches_consumed": steps, "ema": ema,
           "state": {"stage": 2} if method == "hypersd" else {}}
    if method == "ict":  # s0 2, s1 16, K 10: K' = 10 // 4 = 2
        exp["num_scales"] = [3, 3, 5, 5, 9, 9, 17, 17, 17, 17]
    if method in ("dmd2", "fdistill"):
        ratio = 3 if method == "dmd2" else 2
        gen = [k + 1 for k in range(steps) if k % ratio == 0]
        exp["generator_rows"] = gen
        exp["adam_steps"] = [[len(gen)], [steps]]
    if method == "hypersd":
        s = HYPERSD_STAGE_STEPS
        exp["segments"] = [4] * s + [2] * s + [1] * (steps - 2 * s)
        exp["reward_rows"] = list(range(s + 1, 2 * s + 1))
        exp["dm_rows"] = [k + 1 for k in range(2 * s, steps) if (k - 2 * s) % 2 == 0]
    if method == "rglcd":
        exp["lrm_rows"] = list(range(1, steps + 1))
    return exp


def sigterm_during_step(monkeypatch, step: int) -> list[int]:
    """Send this process SIGTERM from inside the first optimizer update of ``step`` (after
    the forward pass, before backward): the run must finish that step. Returns a list that
    holds the global step at the moment the signal was sent."""
    from diffdistill.trainers.base import Trainer

    real, sent = Trainer.step, []

    def step_with_a_signal(self, name, loss):
        if not sent and self.global_step == step - 1:
            sent.append(self.global_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, name, loss)

    monkeypatch.setattr(Trainer, "step", step_with_a_signal)
    return sent


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sigterm_then_sigkill_then_resume_latest_is_bit_identical(
        method, sd_dir, pixel_dir, reward_section, tmp_path, monkeypatch, capfd, caplog):
    steps, kill_after = PLAN[method]
    model_dir = sd_dir if method in LATENT_METHODS else pixel_dir
    ref, out = tmp_path / "ref", tmp_path / "crash"
    cfg = write_run(tmp_path, method, model_dir, out, reward_section, steps)

    # SIGTERM mid-step: the step completes, its checkpoint is written (checkpoint_every would
    # not write one there), the command exits 75 with one line saying where to continue
    with monkeypatch.context() as m:
        sent = sigterm_during_step(m, STOP_STEP)
        assert cli(["train", str(cfg), "train.checkpoint_every=100"]) == STOPPED_EXIT_CODE
    assert sent == [STOP_STEP - 1]
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{STOP_STEP}"]
    assert sorted(rows_by_step(out)) == list(range(1, STOP_STEP + 1))
    stopped = [line for line in capfd.readouterr().err.splitlines() if "stopped by" in line]
    assert stopped == [f"stopped by SIGTERM after step {STOP_STEP} of {steps}: checkpoint "
                       f"{out / 'checkpoints' / f'checkpoint-{STOP_STEP}'}; continue with "
                       "--resume latest"]
    assert not (out / LOCK_NAME).exists()

    proc = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", "train", str(cfg),
                             "--resume", "latest"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        in_write = kill_near_a_checkpoint(proc, out, kill_after)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done = list_checkpoints(out)
    killed_at = ckpt_step(done[-1])
    assert kill_after <= killed_at < steps, "killed too late: slow the run down"
    # "latest" is complete: the rename of a finished temporary folder is its last act
    assert (done[-1] / "trainer_state.json").is_file()
    assert load_file(str(done[-1] / "model.safetensors"))
    # a crash inside the next checkpoint's write leaves only its temporary folder behind
    half = out / "checkpoints" / f".tmp-checkpoint-{killed_at + 1}"
    if not in_write:
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"truncated")
    assert half.is_dir() and list_checkpoints(out)[-1] == done[-1]
    if method == "hypersd":
        assert killed_at >= HYPERSD_STAGE_STEPS  # resumes in a later stage than the first

    assert (out / LOCK_NAME).is_file()  # the killed process could not release its lock
    caplog.clear()
    assert cli(["train", str(cfg), "--resume", "latest"]) == 0
    assert f"taking over the lock of a run that is gone (pid {proc.pid} " in caplog.text
    assert cli(["train", str(write_run(tmp_path, method, model_dir, ref, reward_section,
                                       steps))]) == 0

    final_ref, final = list_checkpoints(ref)[-1], list_checkpoints(out)[-1]
    assert final_ref.name == final.name == f"checkpoint-{steps}"
    names = assert_same_safetensors(final_ref, final)
    assert {"model.safetensors", "trainer_tensors.safetensors",
            "trainer_rng_0.safetensors"} <= set(names)
    assert_same_optimizers(final_ref, final)
    assert rows_by_step(out) == rows_by_step(ref)
    assert sorted(rows_by_step(ref)) == list(range(1, steps + 1))
    want = expected_phase(method, steps)
    got_ref, got = phase(method, ref, final_ref), phase(method, out, final)
    assert got == got_ref
    assert {k: got[k] for k in want} == want
    if method == "fdistill":  # every generator step counted its samples into the bins
        assert sum(got["bin_count"]) == 2 * len(want["generator_rows"])
    assert not half.exists()  # the resumed run's save of that step replaced the leftover
    assert (out / "export").is_dir() and (ref / "export").is_dir()


# ----------------------------------------------------------------------------- in-process cases


def _pretrain_cfg(model_dir, out, steps, **train):
    from diffdistill.trainers.pretrain import PretrainConfig

    from diffdistill.config import build_config

    return build_config(PretrainConfig, method_run_data(
        "pretrain", model_dir, out, steps=steps,
        train={"checkpoint_every": 1, "ema_decay": 0.0, **train}))


def test_resume_replays_dropout_masks_drawn_from_the_global_rng(pixel_dir, tmp_path):
    """A UNet with dropout draws from the global RNG. Starting the DataLoader used to draw its
    worker seeds from that RNG too, at step 0 in one run and at the resume step in the other,
    which shifted every later dropout mask of the resumed run."""
    import shutil

    from diffdistill.trainers.pretrain import PretrainTrainer

    model = tmp_path / "dropout-unet"
    shutil.copytree(pixel_dir, model)
    conf = json.loads((model / "unet" / "config.json").read_text())
    conf["dropout"] = 0.2
    (model / "unet" / "config.json").write_text(json.dumps(conf))
    PretrainTrainer(_pretrain_cfg(model, tmp_path / "a", 4)).fit()
    PretrainTrainer(_pretrain_cfg(model, tmp_path / "b", 2)).fit()
    PretrainTrainer(_pretrain_cfg(model, tmp_path / "b", 4)).fit(resume="latest")
    a, b = list_checkpoints(tmp_path / "a")[-1], list_checkpoints(tmp_path / "b")[-1]
    assert_same_safetensors(a, b)
    assert rows_by_step(tmp_path / "a") == rows_by_step(tmp_path / "b")
    # the masks are live: two training-mode forwards of the same input differ
    tr = PretrainTrainer(_pretrain_cfg(model, tmp_path / "c", 1))
    tr.setup()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        y1, y2 = (tr.unet(x, t, class_labels=torch.tensor([1])).sample for _ in range(2))
    assert not torch.equal(y1, y2)


class _Killed(BaseException):
    pass


def test_crash_while_replacing_a_checkpoint_keeps_latest_complete(pixel_dir, tmp_path,
                                                                   monkeypatch):
    """Resuming from an older checkpoint re-writes the newer step's folder. A crash while the
    old folder of that step is being deleted must not leave a half-deleted "latest"."""
    import shutil

    from diffdistill.trainers import checkpointing
    from diffdistill.trainers.pretrain import PretrainTrainer

    out = tmp_path / "r"
    PretrainTrainer(_pretrain_cfg(pixel_dir, out, 3, keep_checkpoints=2)).fit()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    real = shutil.rmtree

    def dies_half_way(path, *a, **k):  # the process is killed after deleting one file
        path = Path(path)
        files = sorted(p for p in path.rglob("*.safetensors")) if path.is_dir() else []
        if files and not path.name.startswith(".tmp-"):
            files[0].unlink()
            raise _Killed(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dies_half_way)
    with pytest.raises(_Killed):
        PretrainTrainer(_pretrain_cfg(pixel_dir, out, 3, keep_checkpoints=2)).fit(
            resume=str(out / "checkpoints" / "checkpoint-2"))
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real)
    for ck in list_checkpoints(out):  # whatever "latest" is, it is complete and loads
        assert (ck / "trainer_state.json").is_file(), ck
        assert {"model.safetensors", "trainer_rng_0.safetensors"} <= {
            p.name for p in ck.glob("*.safetensors")}, ck
    latest = list_checkpoints(out)[-1]  # the old step-3 folder was moved away: step 2
    assert latest.name == "checkpoint-2"
    ref = tmp_path / "ref"
    PretrainTrainer(_pretrain_cfg(pixel_dir, ref, 3)).fit()
    PretrainTrainer(_pretrain_cfg(pixel_dir, out, 3, keep_checkpoints=2)).fit(resume="latest")
    assert_same_safetensors(list_checkpoints(ref)[-1], list_checkpoints(out)[-1])
