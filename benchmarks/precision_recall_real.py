"""What precision / recall read for *real* images on the world: the first N Fashion-MNIST
training images against the first N test images, in the bench's feature space (the world's
Fashion-MNIST net, k = 3) — the ceiling a generator's row is read against, since both numbers
depend on N and on the feature space (Kynkäänniemi et al. 2019 report them at 50k).

    python benchmarks/precision_recall_real.py [--n 1000 10000] [--k 3]
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    import torch
    from diffdistill.eval.features import get_detector, iter_feature_batches
    from diffdistill.eval.precision_recall import precision_recall

    import diffdistill.world  # noqa: F401  (registers fmnist-net)
    from diffdistill.data import fashion_mnist_uint8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args(argv)
    det = get_detector("fmnist-net")

    def feats(split: str, n: int) -> torch.Tensor:
        imgs = fashion_mnist_uint8(split, 32, limit=n)
        return torch.cat(list(iter_feature_batches(det, imgs, batch_size=500)))

    print(f"| N | precision | recall | seconds |  (fmnist-net features, k = {args.k}: "
          "train images vs test images)")
    print("|---:|---:|---:|---:|")
    for n in args.n:
        t0 = time.perf_counter()
        pr = precision_recall(feats("test", n), feats("train", n), k=args.k)
        print(f"| {n} | {pr.precision:.4f} | {pr.recall:.4f} | {time.perf_counter() - t0:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
