"""Training logs: every line averages each key over its window (so a generator that steps
once per TTUR cycle shows on every line), the window survives a resume exactly, and the
periodic evaluation turns into convergence curves (metric vs step and vs wall time)."""

from __future__ import annotations

import json

import pytest
from diffdistill.eval.convergence import (
    collect,
    read_curves,
    training_run_of,
    write_convergence,
)
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from diffdistill.trainers.metrics_log import LogWindow
from helpers import tiny_run_data

from diffdistill.config import build_config


def test_log_window_means_each_key_over_the_steps_that_logged_it():
    w = LogWindow()
    w.add({"loss_fake": 1.0, "loss_dm": 4.0})
    w.add({"loss_fake": 2.0})
    w.add({"loss_fake": 6.0, "loss_dm": 8.0})
    saved = json.loads(json.dumps(w.state()))  # a checkpoint's JSON round trip
    assert w.pop() == {"loss_fake": 3.0, "loss_dm": 6.0}
    assert w.pop() == {}
    again = LogWindow()
    again.load(saved)
    assert again.pop() == {"loss_fake": 3.0, "loss_dm": 6.0}


def _dmd2(pixel_dir, out, max_steps, **train):
    data = tiny_run_data("dmd2", pixel_dir, out, 16,
                         train={"max_steps": max_steps, **train}, log={"every": 2},
                         dmd2={"fake_updates_per_generator_update": 3})
    return DMD2Trainer(build_config(DMD2Config, data))


def _rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "it_per_s"} for r in rows]


class _Crash(Exception):
    pass


def test_a_window_cut_by_a_crash_resumes_to_the_same_lines(pixel_dir, tmp_path):
    """log.every 2, a checkpoint at 3 and a crash right after it: the resumed run's line at
    step 4 averages steps 3 and 4, as the uninterrupted run's does."""
    _dmd2(pixel_dir, tmp_path / "a", 6).fit()
    cut = _dmd2(pixel_dir, tmp_path / "b", 6, checkpoint_every=3)
    write = cut.checkpoint

    def checkpoint_then_crash():
        write()
        raise _Crash

    cut.checkpoint = checkpoint_then_crash
    with pytest.raises(_Crash):
        cut.fit()
    cut.accelerator.end_training()
    assert list_checkpoints(tmp_path / "b")[-1].name == "checkpoint-3"
    _dmd2(pixel_dir, tmp_path / "b", 6, checkpoint_every=3).fit(resume="latest")
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in a] == [2, 4, 6] and [r["step"] for r in b] == [2, 4, 6]
    assert a == b
    # generator steps at global steps 0 and 3 (lines 1-2 and 3-4); fake-score steps always
    assert ["loss_dm" in r for r in a] == [True, True, False]
    assert all("loss_fake" in r for r in a)


def _write_metrics(run, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                       + '{"step": 9, "eval/fid_x_1st')  # a cut last line


def test_convergence_curves_from_metrics_files(tmp_path):
    _write_metrics(tmp_path / "dmd2", [
        {"step": 1, "loss_fake": 0.5},
        {"step": 2, "eval/fid_fmnist_1step": 30.0, "train_wall_s": 10.0},
        {"step": 4, "eval/fid_fmnist_1step": 12.0, "train_wall_s": 21.0},
        {"step": 4, "eval/fid_fmnist_1step": 11.0, "train_wall_s": 20.5},  # redone after resume
    ])
    _write_metrics(tmp_path / "lcd", [
        {"step": 2, "eval/fid_fmnist_1step": 40.0, "eval/fid_fmnist_4step": 20.0,
         "train_wall_s": 5.0}])
    curves = collect({"DMD2": tmp_path / "dmd2", "LCD": tmp_path / "lcd",
                      "none": tmp_path / "missing"})
    assert list(curves) == ["DMD2", "LCD (1 step)", "LCD (4 step)"]
    assert curves["DMD2"] == {"metric": "eval/fid_fmnist_1step", "steps": [2, 4],
                              "wall_s": [10.0, 20.5], "values": [30.0, 11.0]}
    assert curves["LCD (4 step)"]["values"] == [20.0]
    paths = write_convergence(curves, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == curves
    assert paths["plot"].stat().st_size > 1000
    assert read_curves(tmp_path / "missing", "x") == {}


def test_periodic_eval_lines_carry_the_training_wall_time(pixel_dir, tmp_path, monkeypatch):
    import diffdistill.eval.harness as harness

    monkeypatch.setattr(harness, "quick_eval", lambda trainer, spec: {"eval/fid_x_1step": 1.5})
    tr = _dmd2(pixel_dir, tmp_path / "e", 2)
    tr.cfg.eval.every = 1
    tr.fit()
    rows = [r for r in _rows(tmp_path / "e") if "eval/fid_x_1step" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert 0 < rows[0]["train_wall_s"] < rows[1]["train_wall_s"]
    # the discriminator's AUC is logged beside it but is not a convergence curve
    assert all("eval/d_auc" in r for r in rows)
    assert read_curves(tmp_path / "e", "DMD2")["DMD2"]["wall_s"] == [
        r["train_wall_s"] for r in rows]


@pytest.mark.parametrize("bad", ["", "{"])
def test_unreadable_lines_are_skipped(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text(bad + "\n")
    assert read_curves(tmp_path, "x") == {}


def test_training_run_of_an_export(tmp_path):
    (tmp_path / "run" / "export").mkdir(parents=True)
    assert training_run_of(tmp_path / "run" / "export") is None  # no metrics.jsonl yet
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert training_run_of(tmp_path / "run" / "export") == (tmp_path / "run").resolve()
    assert training_run_of("world:teacher_latent") is None and training_run_of("") is None


def test_convergence_command(tmp_path, capsys):
    from diffdistill.cli import main

    _write_metrics(tmp_path / "a", [{"step": 5, "eval/fid_fmnist_1step": 9.0,
                                     "train_wall_s": 3.0}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["convergence", f"DMD2={tmp_path / 'a'}", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "convergence.json").read_text())["DMD2"]["values"] == [9.0]
    assert main(["convergence", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert main(["convergence", str(tmp_path / "empty")]) == 2
    assert "eval.every" in capsys.readouterr().err


def test_heartbeat_lines_come_every_period_with_rate_and_eta():
    from diffdistill.trainers.metrics_log import Heartbeat

    now, lines = [0.0], []
    beat = Heartbeat("DMD2 (no GAN)", total=100, every_s=10.0, start_step=20,
                     clock=lambda: now[0], write=lines.append)
    now[0] = 5.0
    assert beat.tick(25) is None  # not yet 10 s
    now[0] = 10.0
    assert beat.tick(40) == "[DMD2 (no GAN)] step 40/100  2.00 it/s  ETA 0m 30s"
    now[0] = 12.0
    assert beat.tick(44) is None
    now[0] = 13.0
    beat.tick(100)  # the last step always reports
    assert lines == ["[DMD2 (no GAN)] step 40/100  2.00 it/s  ETA 0m 30s",
                     "[DMD2 (no GAN)] step 100/100  6.15 it/s  ETA 0m 00s"]


def test_trainer_heartbeat_with_a_label(pixel_dir, tmp_path, capsys):
    tr = _dmd2(pixel_dir, tmp_path / "h", 2)
    tr.cfg.log.heartbeat_s = 1e-9
    tr.cfg.log.name = "DMD2 (no GAN)"
    tr.fit()
    out = capsys.readouterr().out
    assert "[DMD2 (no GAN)] step 1/2" in out and "[DMD2 (no GAN)] step 2/2" in out

