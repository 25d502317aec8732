#!/usr/bin/env bash
# Prepare, on a networked machine with this project installed, what an offline GPU machine
# lacks for benchmarks/gpu_check.sh:
#   ./wheels      (about 40 MB) the set that installed and ran there on 2026-11-28, on an
#                 image with Python 3.12, torch 2.11 + CUDA, accelerate, numpy, scipy, pillow,
#                 psutil, anyio, h11, einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py already
#                 present: the project's own pins (constraints.txt) for what that image lacks
#                 or has in another version, their missing dependencies (httpx2/httpcore2 need
#                 truststore), setuptools >= 77 for `pip install -e .` (PEP 639 licence
#                 field), and DeepSpeed's source archive with pydantic;
#   ./gpu_fmnist  (5 MB) Fashion-MNIST's test split and the first 2000 training images as IDX
#                 files (the training stages' data; gpu_check.sh uses the folder when
#                 DIFFDISTILL_FMNIST is unset); FMNIST_TRAIN_IMAGES=60000 writes the whole
#                 training split instead (26 MB: benchmarks/gpu_ict_scratch.sh needs it).
# Both are git-ignored; carry them to the GPU machine with the checkout.
#
#     bash benchmarks/gpu_prepare.sh [PYVER]       # PYVER: the GPU machine's Python, e.g. 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PIP="${PIP:-python -m pip}"
mkdir -p wheels
plat=(--python-version "$PYVER" --implementation cp --only-binary=:all:)
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64; do
    plat+=(--platform "$p")
done
$PIP download -q --no-deps "${plat[@]}" -d wheels \
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore hf-xet==1.8.0 peft==0.21.2 \
    open_clip_torch==3.3.0 timm==1.0.31 lpips==0.1.4 ftfy==6.3.1 wcwidth regex==2026.11.19 \
    click==8.5.1 idna==3.20 typing_extensions==4.16.0 setuptools==84.2.1 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection hjson
$PIP download -q --no-deps --no-binary=:all: -d wheels deepspeed==0.19.8
ls wheels
python - <<'PY'
import os
from pathlib import Path

from diffdistill.data import find_fashion_mnist, load_fashion_mnist, write_idx

src, out = find_fashion_mnist(), Path("gpu_fmnist")
n = int(os.environ.get("FMNIST_TRAIN_IMAGES", 2000))  # 60000: the whole split (26 MB)
out.mkdir(exist_ok=True)
for split, prefix, limit in (("test", "t10k", None), ("train", "train", n)):
    x, y = load_fashion_mnist(split, src)
    write_idx(out / f"{prefix}-images-idx3-ubyte.gz", x[:limit])
    write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", y[:limit].astype("uint8"))
print(f"gpu_fmnist: Fashion-MNIST test split + {n} training images")
PY
