"""benchmarks/eval_throughput.py at tiny size: its extraction path gives exactly the features
(and CLIP score) ``generate_for_eval`` computes, every extractor's path equals its bare
forward bit for bit with finite positive throughputs and ratio, the Fréchet timing returns
eval.fid's value on the same statistics (and the textbook sqrtm formula's), the JSON/markdown
output; and the CLIP detector's batched preprocessing equals open_clip's per-image PIL
transform bit for bit (falling back to it where it is not a plain ToTensor + Normalize)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffdistill.eval.eval_model import EvalModel
from diffdistill.eval.features import get_detector, to_uint8_rgb
from diffdistill.eval.fid import FeatureStats, fid_from_stats, frechet_distance
from diffdistill.eval.generation import generate_for_eval
from diffdistill.eval.prompts import EvalPrompts
from PIL import Image

import diffdistill.world  # noqa: F401  (registers fmnist-net / world-clip)
from diffdistill.backbone import load_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def et():
    spec = importlib.util.spec_from_file_location("eval_throughput",
                                                  ROOT / "benchmarks" / "eval_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world_clip():
    return get_detector("world-clip")


def test_path_gives_the_harness_features_and_clip_score(et, sd_dir, world_clip):
    fm = get_detector("fmnist-net")
    bb = load_backbone(str(sd_dir))
    model = EvalModel("sd", bb, bb.denoiser(), "ddim", guidance_scale=2.0)
    prompts = EvalPrompts()
    gen = generate_for_eval(model, range(5), num_steps=1, prompts=prompts, detectors=[fm],
                            clip=world_clip, batch_size=5, grid_samples=5)
    images = gen.grid  # with resolution None: exactly the generated uint8 batch
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    feats = et.harness_features(fm, images, None)
    mine = FeatureStats(fm.feature_dim).update(feats)
    theirs = gen.stats[fm.name]
    assert mine.count == theirs.count == 5
    assert torch.equal(mine.sum, theirs.sum) and torch.equal(mine.outer, theirs.outer)
    img = et.harness_features(world_clip, images, None, clip=True)
    txt = world_clip.encode_text([prompts.clip_caption(i, bb) for i in range(5)])
    per = (img * txt).sum(dim=-1)
    assert float(per.double().sum()) / 5 == gen.clip_score
    # the path at another evaluation resolution resizes exactly as the harness does
    from diffdistill.eval.generation import resize_for_eval

    assert torch.equal(et.harness_features(fm, images, 16), fm(resize_for_eval(images, 16)))
    assert not torch.equal(et.harness_features(fm, images, 16), feats)


def test_every_extractor_tiny(et):
    res = et.run(batch=3, large_batch=2, repeats=1, fd_dims=(48,), fd_n=200, device="cpu")
    assert list(res["extractors"]) == list(et.EXTRACTORS)
    want = {"fmnist-net": ("FID-FMNIST", 32, 128, 3),
            "effnet-lite0": ("FD-EffNetLite0", 224, 1280, 2),
            "inception-v3": ("FID", 299, 2048, 2),
            "world-clip": ("CLIP score (image tower)", 32, 64, 3)}
    for name, r in res["extractors"].items():
        metric, px, dim, batch = want[name]
        got = (r["metric"], r["input_px"], r["feature_dim"], r["batch"])
        assert got == (metric, px, dim, batch)
        assert r["features_identical"] is True
        ips = r["images_per_s"]
        for k in ("path", "forward"):
            assert math.isfinite(ips[k]) and ips[k] > 0
            assert ips[k] == pytest.approx(batch / r["median_s"][k])
            assert len(r["times_s"][k]) == 1
        assert math.isfinite(r["path_over_forward"]) and r["path_over_forward"] > 0
        assert r["path_over_forward"] == pytest.approx(ips["path"] / ips["forward"])
    (fd,) = res["frechet"]
    assert (fd["dim"], fd["n"]) == (48, 200)
    assert fd["value"] == fid_from_stats(*et.random_stats(48, 200, 0))
    md = et.markdown(res)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [r.split("|")[1].strip() for r in rows[1:5]] == list(et.EXTRACTORS)
    assert rows[6].split("|")[1].strip() == "48"


def _sqrtm_frechet(mu1, c1, mu2, c2) -> float:
    """The textbook formula through scipy's matrix square root (pytorch-fid)."""
    from scipy import linalg

    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def test_frechet_timing_returns_eval_fid_value(et):
    out = et.time_frechet(64, 500, repeats=2, seed=3)
    s1, s2 = et.random_stats(64, 500, seed=3)
    assert s1.count == s2.count == 500
    assert out["value"] == fid_from_stats(s1, s2)
    assert out["value"] == frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov())
    ref = _sqrtm_frechet(s1.mean().numpy(), s1.cov().numpy(), s2.mean().numpy(), s2.cov().numpy())
    assert out["value"] == pytest.approx(ref, rel=1e-9)
    # N(0, I) vs N(0.05, 1.21 I): 64 · (0.05² + (1 − 1.1)²) = 0.8, plus the finite-N bias
    assert 0.8 < out["value"] < 0.8 + 4 * 64 * 64 / 500
    for k in ("median_s", "cov_median_s", "frechet_median_s"):
        assert math.isfinite(out[k]) and out[k] > 0
    assert len(out["times_s"]) == 2


def test_main_prints_table_and_writes_json(et, tmp_path, capsys):
    path = tmp_path / "r.json"
    et.main(["--extractors", "fmnist-net", "--batch", "4", "--repeats", "2", "--fd-dims", "32",
             "--fd-n", "100", "--device", "cpu", "--json", str(path)])
    res = json.loads(path.read_text())
    r = res["extractors"]["fmnist-net"]
    assert r["batch"] == 4 and r["features_identical"] is True and len(r["times_s"]["path"]) == 2
    assert res["frechet"][0]["dim"] == 32 and res["machine"]["threads"] >= 1
    out = capsys.readouterr().out
    ips = r["images_per_s"]["path"]
    assert f"| fmnist-net | FID-FMNIST | world (shipped) | 32 | 4 | {ips:.1f} |" in out
    assert f"{r['path_over_forward']:.3f}" in out


def _pil_preprocess(detector, images):
    arr = to_uint8_rgb(images).permute(0, 2, 3, 1).numpy()
    return torch.stack([detector.preprocess(Image.fromarray(a)) for a in arr])


def test_clip_batched_preprocess_equals_open_clip_transform(world_clip):
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=g)
    odd = torch.randint(0, 256, (2, 3, 40, 28), dtype=torch.uint8, generator=g)
    assert world_clip._batched_preprocess(32, 32) is not None  # the fast path is taken ...
    assert world_clip._batched_preprocess(40, 28) is None  # ... not where PIL must resize
    for images in (rgb, gray, odd):
        assert torch.equal(world_clip._pixels(images), _pil_preprocess(world_clip, images))
    # a transform with any other step keeps the per-image path
    other = get_detector("world-clip")
    assert torch.equal(other._pixels(rgb), world_clip._pixels(rgb))  # plan cached ...
    other.preprocess = T.Compose([*world_clip.preprocess.transforms[:-1], T.Grayscale(3),
                                  world_clip.preprocess.transforms[-1]])
    assert other._batched_preprocess(32, 32) is None  # ... per transform
    assert torch.equal(other._pixels(rgb), _pil_preprocess(other, rgb))
    assert not torch.equal(other._pixels(rgb), world_clip._pixels(rgb))
