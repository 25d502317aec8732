"""The trainers' data loop across epochs and resumes (``Trainer._batches``):

* each epoch gets ``dataset.set_epoch(epoch)``, so random crops / flips differ between epochs
  (they did not: every epoch replayed epoch 0's flips);
* an iterable dataset (webdataset shards, no random access) resumed from a checkpoint
  continues with exactly the batches an uninterrupted run sees, across epoch boundaries.

No model is loaded: the data loop, the checkpoint and the resume are the Trainer base's own.
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from diffdistill.trainers.base import Trainer
from PIL import Image

from diffdistill.config import BaseConfig, build_config


class DataOnly(Trainer):
    method = "data-only"

    def build(self) -> None:  # no networks: the data loop is what is tested
        pass


def _trainer(out, kind, path, **data):
    cfg = build_config(BaseConfig, {
        "method": "data-only", "output_dir": str(out), "seed": 3,
        "data": {"kind": kind, "path": str(path), "resolution": 8, **data},
        "train": {"batch_size": 2, "cpu": True, "checkpoint_every": 1},
        "log": {"progress": False, "tensorboard": False},
    })
    tr = DataOnly(cfg)
    tr.dataset = tr.make_dataset()
    return tr


def _asymmetric(i: int) -> Image.Image:
    """8x8, bright left half: a horizontal flip is visible in the pixels."""
    img = Image.new("RGB", (8, 8), (10 * i, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 8))
    return img


def _flipped(pixels: torch.Tensor) -> list[bool]:
    left, right = pixels[..., :4].mean(dim=(1, 2, 3)), pixels[..., 4:].mean(dim=(1, 2, 3))
    return (right > left).tolist()


def test_random_flips_change_from_epoch_to_epoch(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        _asymmetric(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    tr = _trainer(tmp_path / "run", "imagefolder", folder, random_flip=True)
    batches = tr._batches()
    flips: dict[int, list[bool]] = {i: [] for i in range(4)}
    for _ in range(2 * 8):  # 8 epochs of 2 batches
        batch = next(batches)
        for idx, f in zip(batch["index"].tolist(), _flipped(batch["pixel_values"])):
            flips[idx].append(f)
    assert tr.data_epoch == 7 and tr.epoch_batches == 2
    assert all(len(v) == 8 for v in flips.values())
    # each image's flip is a fresh coin per epoch: not the same in all 8 epochs
    assert all(len(set(v)) == 2 for v in flips.values()), flips


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    _asymmetric(i).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    for s, n in ((0, 5), (1, 4)):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as archive:
            for i in range(n):
                for ext, payload in (("png", _png(s * 10 + i)),
                                     ("txt", f"sample {s}/{i}".encode())):
                    info = tarfile.TarInfo(f"{s}-{i:03d}.{ext}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return str(tmp_path / "shard-{0..1}.tar")


def _keys(batches, n):
    return [tuple(next(batches)["key"]) for _ in range(n)]


def test_webdataset_resume_continues_with_the_same_batches(tmp_path, shards):
    # 9 samples, batch 2, drop_last: 4 batches per pass
    whole = _keys(_trainer(tmp_path / "a", "webdataset", shards, random_flip=True)._batches(), 11)
    assert len(set(whole[:4])) == 4 and whole[4:8] == whole[:4]  # epoch 1 replays the shards

    first = _trainer(tmp_path / "b", "webdataset", shards, random_flip=True)
    batches = first._batches()
    seen = _keys(batches, 6)  # into epoch 1
    first.global_step = 6
    first.checkpoint()
    assert (first.data_epoch, first.epoch_batches) == (1, 2)

    resumed = _trainer(tmp_path / "b", "webdataset", shards, random_flip=True)
    resumed.resume("latest")
    assert (resumed.data_epoch, resumed.epoch_batches) == (1, 2)
    assert seen + _keys(resumed._batches(), 5) == whole


def test_webdataset_flips_follow_the_epoch_after_a_resume(tmp_path, shards):
    def pixels(tr, n):
        b = tr._batches()
        return torch.cat([next(b)["pixel_values"] for _ in range(n)])

    whole = pixels(_trainer(tmp_path / "a", "webdataset", shards, random_flip=True), 12)
    first = _trainer(tmp_path / "b", "webdataset", shards, random_flip=True)
    part = pixels(first, 5)
    first.global_step = 5
    first.checkpoint()
    resumed = _trainer(tmp_path / "b", "webdataset", shards, random_flip=True)
    resumed.resume("latest")
    assert torch.equal(torch.cat([part, pixels(resumed, 7)]), whole)
    # and the epochs do differ: some sample is flipped in one epoch and not in another
    per_epoch = whole.reshape(3, 8, *whole.shape[1:])
    assert not (torch.equal(per_epoch[0], per_epoch[1]) and torch.equal(per_epoch[1], per_epoch[2]))


def test_webdataset_shard_order_reshuffles_per_epoch_and_resumes_exactly(tmp_path, shards):
    def run(out):
        return _trainer(out, "webdataset", shards, shuffle_shards=True)

    whole = _keys(run(tmp_path / "a")._batches(), 32)  # 8 epochs of 4 batches
    leading_shard = {whole[4 * e][0].split(".tar/")[0] for e in range(8)}
    assert len(leading_shard) == 2  # each shard comes first in some epoch (fixed: shard-0)
    first = run(tmp_path / "b")
    seen = _keys(first._batches(), 13)
    first.global_step = 13
    first.checkpoint()
    resumed = run(tmp_path / "b")
    resumed.resume("latest")
    assert seen + _keys(resumed._batches(), 19) == whole


def test_shuffle_shards_is_only_for_webdataset(tmp_path):
    from diffdistill.config import ConfigError

    with pytest.raises(ConfigError, match="data.shuffle_shards is for data.kind=webdataset"):
        _trainer(tmp_path, "imagefolder", tmp_path, shuffle_shards=True)


PROBE = '''
import json, sys
from diffdistill.config import BaseConfig, build_config
from diffdistill.trainers.base import Trainer


class DataOnly(Trainer):
    method = "data-only"

    def build(self):
        pass


data, n, resume, report = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
tr = DataOnly(build_config(BaseConfig, data))
tr.dataset = tr.make_dataset()
if resume == "resume":
    tr.resume("latest")
batches = tr._batches()
keys = [list(next(batches)["key"]) for _ in range(n)]
tr.global_step += n
tr.checkpoint()
with open(f"{report}-rank{tr.rank}.json", "w") as f:
    json.dump({"world": tr.world, "keys": keys, "position": [tr.data_epoch, tr.epoch_batches]}, f)
'''


def test_webdataset_resume_under_two_processes(tmp_path):
    """Each rank reads its own shards (here of different lengths, so the ranks' epochs drift
    apart) and resumes at its own position."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for s, n in ((0, 5), (1, 7), (2, 3)):  # rank 0: shards 0 and 2; rank 1: shard 1
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as archive:
            for i in range(n):
                for ext, payload in (("png", _png(s * 10 + i)), ("txt", f"{s}/{i}".encode())):
                    info = tarfile.TarInfo(f"{s}-{i:03d}.{ext}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)

    from helpers import free_port

    def launch(out, n, mode, port):
        data = {"method": "data-only", "output_dir": str(out), "seed": 3,
                "data": {"kind": "webdataset", "path": str(tmp_path / "shard-{0..2}.tar"),
                         "resolution": 8, "random_flip": True, "shuffle_shards": True},
                "train": {"batch_size": 2, "checkpoint_every": 1},
                "log": {"progress": False, "tensorboard": False}}
        r = subprocess.run(
            [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
             str(root / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(port),
             str(probe), json.dumps(data), str(n), mode, str(out / "report")],
            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-4000:]
        return [json.loads((out / f"report-rank{k}.json").read_text()) for k in (0, 1)]

    whole = launch(tmp_path / "a", 9, "fresh", free_port())
    part = launch(tmp_path / "b", 4, "fresh", free_port())
    rest = launch(tmp_path / "b", 5, "resume", free_port())
    assert [r["world"] for r in whole] == [2, 2]
    for k in (0, 1):
        assert part[k]["keys"] + rest[k]["keys"] == whole[k]["keys"], k
        assert rest[k]["position"] == whole[k]["position"], k
    # the ranks start on different shards and drift to different places in their epochs
    first_shard = [r["keys"][0][0].split(".tar/")[0] for r in whole]
    assert first_shard[0] != first_shard[1]
    assert whole[0]["position"] != whole[1]["position"]
