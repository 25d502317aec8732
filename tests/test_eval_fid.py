"""Fréchet distance, streaming statistics, KID and the reference-statistics cache."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffdistill.eval import fid as fidm
from diffdistill.eval.features import extract_features, resize_uint8, to_uint8_rgb
from PIL import Image
from torch import nn


def _random_cov(rng, dim, rank=None):
    rank = dim if rank is None else rank
    a = rng.standard_normal((dim, rank)) * rng.uniform(0.2, 2.0, size=rank)
    return a @ a.T / rank


def _sqrtm_reference(mu1, cov1, mu2, cov2):
    # pytorch-fid's formula, with scipy's general matrix square root (slow but independent)
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean).real)


# ---------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_frechet_closed_form_diagonal_and_rotated(method):
    rng = np.random.default_rng(0)
    dim = 40
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # diagonal covariances: tr sqrt(Σ1Σ2) = Σ sqrt(a_i b_i), so d² = ‖Δμ‖² + Σ (√a_i − √b_i)²
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = fidm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10)
    # a common rotation leaves the distance unchanged but makes the matrices dense
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    got_rot = fidm.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T, method=method)
    assert got_rot == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rank", [None, 20])
def test_frechet_matches_sqrtm_full_and_rank_deficient(rank):
    rng = np.random.default_rng(1)
    dim = 48
    cov1, cov2 = _random_cov(rng, dim, rank), _random_cov(rng, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.5
    ref = _sqrtm_reference(mu1, cov1, mu2, cov2)
    chol = fidm.frechet_distance(mu1, cov1, mu2, cov2, method="cholesky")
    eig = fidm.frechet_distance(torch.from_numpy(mu1), torch.from_numpy(cov1), mu2, cov2, method="eigh")
    assert chol == pytest.approx(ref, rel=1e-8)
    assert eig == pytest.approx(chol, rel=1e-9)
    # symmetric in its arguments, also when the rank-deficient matrix comes second (rounding
    # noise in its null space must not leak in through square roots)
    for method in ("cholesky", "eigh"):
        assert fidm.frechet_distance(mu2, cov2, mu1, cov1, method=method) == pytest.approx(chol, rel=1e-9)


def test_frechet_rank_deficient_against_exact_factor():
    # Σ1 = A Aᵀ with a known rank-12 factor: tr sqrt(Σ1Σ2) = Σ sqrt(eig(Aᵀ Σ2 A)) exactly.
    rng = np.random.default_rng(11)
    dim, rank = 64, 12
    factor = rng.standard_normal((dim, rank))
    cov1 = factor @ factor.T
    cov2 = _random_cov(rng, dim)
    mu = np.zeros(dim)
    exact = np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.linalg.eigvalsh(factor.T @ cov2 @ factor)).sum()
    for method in ("cholesky", "eigh"):
        assert fidm.frechet_distance(mu, cov1, mu, cov2, method=method) == pytest.approx(exact, rel=1e-10)
        assert fidm.frechet_distance(mu, cov2, mu, cov1, method=method) == pytest.approx(exact, rel=1e-10)


def test_frechet_of_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.standard_normal((300, 32)) * 3 + 1)
    stats = fidm.FeatureStats(32).update(feats)
    value = fidm.frechet_distance(stats.mean(), stats.cov(), stats.mean(), stats.cov())
    assert abs(value) < 1e-9 * float(stats.cov().trace())
    shifted = fidm.FeatureStats(32).update(feats + 0.5)
    assert fidm.fid_from_stats(stats, shifted) == pytest.approx(32 * 0.25, rel=1e-9)


# ---------------------------------------------------------------------------------------
# Against torchmetrics with the same feature network
# ---------------------------------------------------------------------------------------

class _TinyDetector(nn.Module):
    """Fixed random conv features; ``num_features`` spares torchmetrics its 299-px probe."""

    name, feature_dim, resize_mode, num_features = "tiny-conv", 12, "legacy", 12

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()

    @torch.no_grad()
    def forward(self, images):
        x = resize_uint8(to_uint8_rgb(images), 16, "legacy") / 127.5 - 1.0
        return F.relu(self.conv(x)).mean(dim=(2, 3)) * 10.0


def test_fid_equals_torchmetrics_with_same_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40).to(torch.uint8)[:50]
    fake[::3] = torch.randint(0, 256, fake[::3].shape, dtype=torch.uint8, generator=g)
    det = _TinyDetector()
    metric = FrechetInceptionDistance(feature=det, normalize=False)
    for batch in real.split(20):
        metric.update(batch, real=True)
    for batch in fake.split(20):
        metric.update(batch, real=False)
    expected = float(metric.compute())

    stats_real = fidm.FeatureStats.for_detector(det).update(extract_features(det, real, 16, progress=False))
    stats_fake = fidm.FeatureStats.for_detector(det).update(extract_features(det, fake, 16, progress=False))
    ours = fidm.fid_from_stats(stats_real, stats_fake)
    assert expected > 0.1
    assert ours == pytest.approx(expected, rel=1e-3)
    assert fidm.fid_from_stats(stats_real, stats_real) == pytest.approx(0.0, abs=1e-8)


def test_metric_name_labels():
    assert fidm.metric_name("inception-v3") == "FID"
    assert fidm.metric_name(_TinyDetector()) == "FD-tiny-conv"
    assert fidm.metric_name("effnet-lite0") == "FD-effnet-lite0"


# ---------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------

def test_streaming_merge_equals_one_pass_and_numpy_cov():
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.standard_normal((257, 16)) * rng.uniform(0.5, 4, 16) + 5.0).float()
    one = fidm.FeatureStats(16, extractor="x").update(feats)
    a = fidm.FeatureStats(16, extractor="x")
    for chunk in feats[:100].split(7):
        a.update(chunk)
    b = fidm.FeatureStats(16, extractor="x").update(feats[100:])
    merged = a.merge(b)
    assert merged.count == one.count == 257
    assert torch.allclose(merged.mean(), one.mean(), rtol=1e-12, atol=0)
    assert torch.allclose(merged.cov(), one.cov(), rtol=1e-10, atol=1e-12)
    f64 = feats.double().numpy()
    assert np.allclose(one.cov().numpy(), np.cov(f64, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)
    assert np.allclose(one.mean().numpy(), f64.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="'extractor'"):
        one.merge(fidm.FeatureStats(16, extractor="y"))


def test_stats_save_load_and_metadata_checks(tmp_path):
    rng = np.random.default_rng(4)
    stats = fidm.FeatureStats(8, extractor="inception-v3", resize_mode="clean", resolution=(64, 64))
    stats.update(torch.from_numpy(rng.standard_normal((20, 8))))
    path = stats.save(tmp_path / "ref")
    assert path.name == "ref.npz"
    back = fidm.FeatureStats.load(path, extractor="inception-v3", resize_mode="clean",
                                  resolution=(64, 64), count=20)
    assert back.count == 20 and back.meta == stats.meta
    assert torch.equal(back.sum, stats.sum) and torch.equal(back.outer, stats.outer)
    with pytest.raises(ValueError, match="'resize_mode'.*legacy"):
        fidm.FeatureStats.load(path, resize_mode="legacy")
    with pytest.raises(ValueError, match="'count'"):
        fidm.FeatureStats.load(path, count=10_000)
    with pytest.raises(ValueError, match="'resolution'"):
        fidm.FeatureStats.load(path, resolution=256)
    with pytest.raises(FileNotFoundError):
        fidm.FeatureStats.load(tmp_path / "absent.npz")


def _all_reduce_worker(rank, world, init_file, feats, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = fidm.FeatureStats(feats.shape[1]).update(feats[rank::world])
        stats.all_reduce(None)
        torch.save({"count": stats.count, "sum": stats.sum, "outer": stats.outer,
                    "world": dist.get_world_size()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    feats = torch.from_numpy(np.random.default_rng(5).standard_normal((31, 6)))
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), feats, str(tmp_path)), nprocs=2, join=True)
    full = fidm.FeatureStats(6).update(feats)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["world"] == 2
        assert got["count"] == 31
        assert torch.allclose(got["sum"], full.sum, rtol=1e-12)
        assert torch.allclose(got["outer"], full.outer, rtol=1e-12)
    # without a process group it is a no-op
    single = fidm.FeatureStats(6).update(feats)
    assert single.all_reduce().count == 31


# ---------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`")
def test_kid_identical_zero_shifted_positive_and_matches_torchmetrics():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((120, 10))).float()
    y = torch.from_numpy(rng.standard_normal((120, 10))).float() + 0.4
    same_mean, _ = fidm.kid(x, x, subsets=5, subset_size=120)
    shifted_mean, shifted_std = fidm.kid(x, y, subsets=20, subset_size=60)
    # With the unbiased within-set terms and the all-pairs cross term (Bińkowski et al.;
    # torch-fidelity, torchmetrics), KID(X, X) is not 0 but exactly
    # -2 (mean k(x_i, x_i) - mean_{i != j} k(x_i, x_j)) / m, i.e. O(1/m).
    kxx = (x.double() @ x.double().T / 10 + 1) ** 3
    m = 120
    off_mean = (kxx.sum() - kxx.trace()) / (m * (m - 1))
    assert same_mean == pytest.approx(float(-2 * (kxx.trace() / m - off_mean) / m), rel=1e-9)
    assert abs(same_mean) < 0.25 * shifted_mean
    assert shifted_mean > 0.3 and shifted_std > 0
    # two independent draws of one distribution: unbiased estimate close to 0
    x2 = torch.from_numpy(rng.standard_normal((120, 10))).float()
    null_mean, _ = fidm.kid(x, x2, subsets=20, subset_size=60)
    assert abs(null_mean) < 0.2 * shifted_mean

    # Using the whole sets makes the subset draw irrelevant; compare to torchmetrics.
    from torchmetrics.image.kid import KernelInceptionDistance

    class _Identity(nn.Module):
        num_features = 10

        def forward(self, feats):
            return feats

    metric = KernelInceptionDistance(feature=_Identity(), subsets=1, subset_size=120)
    metric.update(x, real=True)
    metric.update(y, real=False)
    expected = float(metric.compute()[0])
    ours, _ = fidm.kid(x, y, subsets=3, subset_size=120)
    assert ours == pytest.approx(expected, rel=1e-4)

    # brute-force unbiased MMD² with the cubic kernel
    def k(a, b):
        return (a.double() @ b.double().T / 10 + 1) ** 3

    m = 120
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    brute = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
             - 2 * kxy.mean())
    assert ours == pytest.approx(float(brute), rel=1e-10)
    with pytest.raises(ValueError, match="subset_size"):
        fidm.kid(x, y, subset_size=1000)


# ---------------------------------------------------------------------------------------
# Reference statistics cache
# ---------------------------------------------------------------------------------------

class _Counting(_TinyDetector):
    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += to_uint8_rgb(images).shape[0]
        return super().forward(images)


def test_reference_stats_folder_is_cached_and_reused(tmp_path):
    folder = tmp_path / "ref"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    imgs = torch.randint(0, 256, (9, 3, 20, 24), dtype=torch.uint8, generator=g)
    for i, img in enumerate(imgs):
        target = folder / ("sub" if i % 2 else "") / f"{i:03d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(target)
    (folder / "notes.txt").write_text("ignored")
    cache = tmp_path / "cache"
    det = _Counting()

    first = fidm.reference_stats(det, folder, cache, batch_size=4)
    assert det.images_seen == 9 and first.count == 9
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and "tiny-conv" in files[0].name and "n9" in files[0].name
    second = fidm.reference_stats(det, str(folder), cache, batch_size=4)
    assert det.images_seen == 9  # nothing recomputed
    assert torch.equal(second.sum, first.sum) and torch.equal(second.outer, first.outer)
    assert second.meta["extractor"] == "tiny-conv" and second.meta["resize_mode"] == "legacy"

    # the folder's images in sorted path order are exactly these images
    paths = sorted(p for p in folder.rglob("*.png"))
    order = [int(p.stem) for p in paths]
    direct = fidm.FeatureStats(12).update(det(imgs[order]))
    assert torch.allclose(first.mean(), direct.mean(), rtol=1e-6)

    # a different count or resolution is a different cache entry
    fewer = fidm.reference_stats(det, folder, cache, max_count=5)
    assert fewer.count == 5 and det.images_seen == 9 + 9 + 5
    resized = fidm.reference_stats(det, folder, cache, resolution=16)
    assert resized.meta["resolution"] == 16 and len(list(cache.glob("*.npz"))) == 3
    assert not torch.allclose(resized.mean(), first.mean())


def test_reference_stats_tensor_and_dataset_sources(tmp_path):
    g = torch.Generator().manual_seed(8)
    imgs = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    det = _Counting()
    with pytest.raises(ValueError, match="source_id"):
        fidm.reference_stats(det, imgs, tmp_path)
    by_tensor = fidm.reference_stats(det, imgs, tmp_path, source_id="toy", batch_size=3)
    seen = det.images_seen
    again = fidm.reference_stats(det, imgs, tmp_path, source_id="toy")
    assert det.images_seen == seen and torch.equal(again.outer, by_tensor.outer)
    dataset = torch.utils.data.TensorDataset(imgs, torch.zeros(10))
    by_dataset = fidm.reference_stats(det, dataset, None)
    by_iter = fidm.reference_stats(det, iter(list(imgs.split(4))), None)
    for stats in (by_dataset, by_iter):
        assert stats.count == 10
        assert torch.allclose(stats.outer, by_tensor.outer, rtol=1e-6)
    # max_count counts images, also when an iterable yields batches
    first7 = fidm.reference_stats(det, iter(list(imgs.split(4))), tmp_path, source_id="batches", max_count=7)
    assert first7.count == 7
    assert torch.allclose(first7.sum, fidm.FeatureStats(12).update(det(imgs[:7])).sum, rtol=1e-6)
