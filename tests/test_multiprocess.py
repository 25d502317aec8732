"""Every trainer under 2 CPU processes through ``accelerate launch``: world size 2 inside, each
step logged once, every rank holding the same weights, EMAs and method state at the end, data
shards that never overlap, checkpoints (with one RNG file per rank) and one export written
once, and a resume under 2 processes with a larger ``train.max_steps`` that continues from
the last step with the batches an uninterrupted run would have drawn. A SIGTERM that reaches
one rank stops both after the same step with a checkpoint, and the run resumes bit-identically;
a folder whose lock is held is refused on both ranks.

The launched script is ``diffdistill.train`` plus a probe (written below) that records, per
rank, the dataset indices of every batch and a digest of the trainable weights, EMA shadows
and method state tensors after ``fit`` — what the ranks hold is otherwise invisible, since
only rank 0 writes checkpoints. To pay the start-up of two interpreters twice rather than once
per run, one launch trains every run one after the other (each with its own
Accelerator and output folder, as separate runs would) and a second launch resumes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from diffdistill.trainers.batches import ShardedBatchSampler
from diffdistill.trainers.checkpointing import list_checkpoints
from helpers import ALL_METHODS, LATENT_METHODS, free_port, method_run_data
from standins import TINY_CLIP, make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
BATCH, LIMIT = 2, 16

PROBE = '''
import hashlib, json, sys
from diffdistill.trainers import base

_fit, _batches, seen = base.Trainer.fit, base.Trainer._batches, []


def _probe_batches(self):
    for batch in _batches(self):
        seen.append(batch["index"].tolist())
        yield batch


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _probe_fit(self, resume=None, **kw):
    start_step = None
    def _setup_then_note(*a, _orig=self.setup, **k):
        nonlocal start_step
        _orig(*a, **k)
        start_step = self.global_step
    self.setup = _setup_then_note
    result = _fit(self, resume, **kw)
    report = {
        "rank": self.rank, "world": self.world, "start_step": start_step,
        "global_step": self.global_step, "indices": seen, "state": self.state,
        "weights": {n: _digest(ps) for n, ps in self.trainable.items()},
        "emas": {n: _digest(ema.shadow.values()) for n, (ema, _) in self.emas.items()},
        "state_tensors": _digest([self.state_tensors[k] for k in sorted(self.state_tensors)]),
        "noise": _digest([self.generator.get_state()]),
    }
    path = self.out / f"probe-rank{self.rank}-step{self.global_step}.json"
    path.write_text(json.dumps(report))
    return result


import torch  # noqa: E402
base.Trainer.fit, base.Trainer._batches = _probe_fit, _probe_batches
from diffdistill.cli import main  # noqa: E402
for argv in json.load(open(sys.argv[1])):  # one `diffdistill train ...` after the other
    seen.clear()
    if main(["train", *argv]) != 0:
        sys.exit(f"diffdistill train {argv} failed")
'''


def launch(root: Path, jobs: list[list[str]], port: int) -> str:
    probe, job_file = root / "probe_train.py", root / f"jobs-{port}.json"
    probe.write_text(PROBE)
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accel = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accel), "launch", "--config_file",
                        str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port",
                        str(port), str(probe), str(job_file)],
                       env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-6000:]
    return r.stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out: Path, err: str, step: int) -> dict:
    """What one launch left in ``out`` (read before the next launch changes it)."""
    probes = [json.loads((out / f"probe-rank{r}-step{step}.json").read_text()) for r in (0, 1)]
    return {
        "rows": metrics(out), "probes": probes,
        "checkpoints": [p.name for p in list_checkpoints(out)],
        "rng_files": [sorted(p.name for p in ck.glob("trainer_rng_*"))
                      for ck in list_checkpoints(out)],
        "state": json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text()),
        "folders": sorted(p.name for p in out.iterdir() if p.is_dir()),
        "hidden": sorted(p.name for p in (out / "checkpoints").iterdir()
                         if p.name.startswith(".")),
        "exports_logged": err.count(f"exported to {out / 'export'}\n"),
    }


#: the runs of the two launches: every trainer, f-distill (GAN head on the MMDiT, R1,
#: ratio bins) on the SD3-structured flow transformer, and sCD / rCM (θ⁻ JVP, weight head;
#: rCM's fake score and student/fake phases) on the pixel UNet
RUNS = (*ALL_METHODS, "fdistill-sd3", "scm", "rcm")
#: the sections of the runs that are not in helpers.ALL_METHODS
EXTRA = {"scm": {"scm": {"mode": "cd", "guidance_scale": 2.0, "tangent_warmup_steps": 1}},
         "rcm": {"scm": {"mode": "cd", "guidance_scale": 2.0, "tangent_warmup_steps": 1},
                 "rcm": {"fake_lr": 1e-3, "fake_updates_per_student_update": 2}}}


@pytest.fixture(scope="module")
def runs(sd_dir, sd3_dir, pixel_dir, tmp_path_factory):
    """run -> (snapshot after 2 steps, snapshot after resuming to 3), both under 2 ranks."""
    root = tmp_path_factory.mktemp("ddp")
    cfg_file, weights, _ = make_tiny_clip(root)
    reward = {"kind": "clip", "path": str(weights), "model_name": TINY_CLIP,
              "config_path": str(cfg_file)}
    cfgs, outs = {}, {}
    for run in RUNS:
        m, sd3 = run.removesuffix("-sd3"), run.endswith("-sd3")
        model = sd3_dir if sd3 else sd_dir if m in LATENT_METHODS else pixel_dir
        outs[run] = root / run
        data_section = {"limit": LIMIT, **({"resolution": 32} if sd3 else {})}
        data = method_run_data(m, model, outs[run], steps=2, reward=reward, stage_steps=1,
                               train={"checkpoint_every": 1, "batch_size": BATCH},
                               data=data_section, **EXTRA.get(run, {}))
        cfgs[run] = root / f"{run}.yaml"
        cfgs[run].write_text(yaml.safe_dump(data))
    err = launch(root, [[str(cfgs[r])] for r in RUNS], free_port())
    first = {r: snapshot(outs[r], err, 2) for r in RUNS}
    err = launch(root, [[str(cfgs[r]), "train.max_steps=3", "--resume", "latest"]
                        for r in RUNS], free_port())
    return {r: (first[r], snapshot(outs[r], err, 3)) for r in RUNS}


def sampler_batches(rank: int, seed: int, start: int, count: int) -> list[list[int]]:
    it = iter(ShardedBatchSampler(LIMIT, BATCH, rank, 2, seed, start_batch=start))
    return [next(it) for _ in range(count)]


def assert_ranks_agree(ranks: list[dict]) -> None:
    a, b = ranks
    assert [a["rank"], b["rank"]] == [0, 1] and a["world"] == b["world"] == 2
    for key in ("weights", "emas", "state_tensors", "state", "global_step"):
        assert a[key] == b[key], key
    assert a["weights"] and a["noise"] != b["noise"]  # same weights, per-rank noise streams


@pytest.mark.parametrize("run", RUNS)
def test_two_processes_agree_shard_checkpoint_once_and_resume(run, runs):
    first, resumed = runs[run]
    method = run.removesuffix("-sd3")
    assert {row["world_size"] for row in first["rows"]} == {2}
    assert [row["step"] for row in first["rows"]] == [1, 2]  # logged once, by rank 0
    assert first["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert first["rng_files"] == [["trainer_rng_0.safetensors", "trainer_rng_1.safetensors"]] * 2
    assert first["folders"] == ["checkpoints", "export"] and first["hidden"] == []
    assert first["exports_logged"] == 1  # by rank 0 only
    assert_ranks_agree(first["probes"])
    # disjoint shards: rank r takes slice r of each global batch of the seeded permutation
    for r, p in enumerate(first["probes"]):
        assert p["start_step"] == 0 and p["indices"] == sampler_batches(r, 0, 0, 2)
    used = [i for p in first["probes"] for batch in p["indices"] for i in batch]
    assert len(used) == len(set(used)) == 2 * 2 * BATCH

    rows = resumed["rows"]
    assert [row["step"] for row in rows] == [1, 2, 3] and {r["world_size"] for r in rows} == {2}
    assert resumed["checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    assert resumed["rng_files"] == first["rng_files"]
    assert resumed["state"]["global_step"] == 3 and resumed["state"]["batches_consumed"] == 3
    assert resumed["exports_logged"] == 1 and resumed["hidden"] == []
    assert_ranks_agree(resumed["probes"])
    for r, p in enumerate(resumed["probes"]):  # continues at the 3rd batch of each rank's shard
        assert p["start_step"] == 2 and p["indices"] == sampler_batches(r, 0, 2, 1)
    assert resumed["probes"][0]["weights"] != first["probes"][0]["weights"]  # trained on
    if method == "hypersd":  # stages of one step each: 4 segments, 2 + reward, 1 + DM
        assert [row["segments"] for row in rows] == [4, 2, 1]
        assert first["probes"][0]["state"] == {"stage": 1}
        assert resumed["probes"][0]["state"] == {"stage": 2}
    if method in ("dmd2", "fdistill"):  # TTUR ratio 3 / 2: generator on steps 0 / 0, 2
        gen = [row["step"] for row in rows if "loss_dm" in row]
        assert gen == ([1] if method == "dmd2" else [1, 3])
    if method == "rcm":  # warm-up step 0 (sCD only), then the student + DM on 1, fake on 2
        assert [row["step"] for row in rows if "loss_dm" in row] == [2]
        assert [row["step"] for row in rows if "loss_scd" in row] == [1, 2]


# ----------------------------------------------------------------------------- stop signal

STOP_PROBE = '''
import json, os, sys
from pathlib import Path
from diffdistill.cli import main
rank, tag = int(os.environ["RANK"]), sys.argv[1]
jobs, report = json.load(open(sys.argv[2])), Path(sys.argv[3])
(report / f"{tag}-pid-rank{rank}").write_text(str(os.getpid()))
codes = [main(["train", *argv]) for argv in jobs]
(report / f"{tag}-rc-rank{rank}.json").write_text(json.dumps(codes))
sys.exit(codes[-1])
'''


def start_launch(root: Path, tag: str, jobs: list[list[str]]) -> subprocess.Popen:
    probe, job_file = root / "stop_probe.py", root / f"{tag}.json"
    probe.write_text(STOP_PROBE)
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accel = Path(sys.executable).with_name("accelerate")
    return subprocess.Popen([str(accel), "launch", "--config_file",
                             str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
                             "--main_process_port", str(free_port()), str(probe), tag,
                             str(job_file), str(root)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bit_identically(pixel_dir,
                                                                               tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step (the stop flag is
    all-reduced every step), write that step's checkpoint together and exit 75; the lock was
    rank 0's. Resumed under 2 processes the run ends bit-identical to an uninterrupted one.
    A run into a folder whose lock is held refuses on both ranks before any work."""
    import time

    import torch
    from diffdistill.trainers.run_guard import LOCK_NAME, RunLock
    from safetensors.torch import load_file

    from diffdistill.errors import STOPPED_EXIT_CODE

    steps = 24
    cfgs = {}
    for name in ("stop", "ref", "locked"):
        data = method_run_data("pretrain", pixel_dir, tmp_path / name, steps=steps,
                               train={"checkpoint_every": 0, "batch_size": BATCH},
                               data={"limit": LIMIT})
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(data))
    out = tmp_path / "stop"

    launch = start_launch(tmp_path, "a", [[str(cfgs["stop"])]])
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").exists()
                   and len((out / "metrics.jsonl").read_text().splitlines()) >= 2
                   and (tmp_path / "a-pid-rank1").exists()):
            assert launch.poll() is None, launch.stderr.read()[-4000:]
            assert time.time() < deadline, "the 2-process run did not start"
            time.sleep(0.01)
        pids = [int((tmp_path / f"a-pid-rank{r}").read_text()) for r in (0, 1)]
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == pids[0]  # rank 0's lock
        os.kill(pids[1], signal.SIGTERM)
        err = launch.communicate(timeout=180)[1]
    finally:
        if launch.poll() is None:
            launch.kill()
    codes = [json.loads((tmp_path / f"a-rc-rank{r}.json").read_text()) for r in (0, 1)]
    assert codes == [[STOPPED_EXIT_CODE], [STOPPED_EXIT_CODE]], err[-4000:]
    rows = metrics(out)
    stop_step = rows[-1]["step"]
    assert 2 <= stop_step < steps and {r["world_size"] for r in rows} == {2}
    assert [r["step"] for r in rows] == list(range(1, stop_step + 1))
    (ckpt,) = list_checkpoints(out)
    assert ckpt.name == f"checkpoint-{stop_step}"
    assert sorted(p.name for p in ckpt.glob("trainer_rng_*")) == [
        "trainer_rng_0.safetensors", "trainer_rng_1.safetensors"]
    assert err.count("SIGTERM received") == 1  # rank 1 only
    assert [line for line in err.splitlines() if line.startswith("stopped by")] == [
        f"stopped by a stop signal to another process after step {stop_step} of {steps}: "
        f"checkpoint {ckpt}; continue with --resume latest"]  # printed once, by rank 0
    assert not (out / LOCK_NAME).exists() and not (out / "export").exists()

    (tmp_path / "locked").mkdir()
    held = RunLock(tmp_path / "locked")
    held.acquire()
    try:
        last = f"train.checkpoint_every={steps}"  # the final checkpoint, to compare
        launch = start_launch(tmp_path, "b", [[str(cfgs["locked"])],
                                              [str(cfgs["stop"]), last, "--resume", "latest"],
                                              [str(cfgs["ref"]), last]])
        err = launch.communicate(timeout=600)[1]
    finally:
        held.release()
    codes = [json.loads((tmp_path / f"b-rc-rank{r}.json").read_text()) for r in (0, 1)]
    assert codes == [[2, 0, 0], [2, 0, 0]], err[-4000:]
    refusals = [line for line in err.splitlines() if "is in use by another run" in line]
    assert len(refusals) == 1 and f"pid {os.getpid()} on host" in refusals[0]  # rank 0's
    assert sorted(p.name for p in (tmp_path / "locked").iterdir()) == []  # nothing written
    final, final_ref = list_checkpoints(out)[-1], list_checkpoints(tmp_path / "ref")[-1]
    assert final.name == final_ref.name == f"checkpoint-{steps}"
    names = sorted(p.name for p in final_ref.glob("*.safetensors"))
    assert {"model.safetensors", "trainer_rng_0.safetensors",
            "trainer_rng_1.safetensors"} <= set(names)
    assert names == sorted(p.name for p in final.glob("*.safetensors"))
    for name in names:
        a, b = load_file(str(final / name)), load_file(str(final_ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def logged(folder):  # per step, the last row of a step logged twice wins
        return {r["step"]: {k: v for k, v in r.items() if k != "it_per_s"}
                for r in metrics(folder)}

    assert logged(out) == logged(tmp_path / "ref")
    assert sorted(logged(out)) == list(range(1, steps + 1))
