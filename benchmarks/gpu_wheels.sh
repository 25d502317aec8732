#!/usr/bin/env bash
# Download, on a networked machine, the wheels benchmarks/gpu_check.sh installs offline on the
# GPU machine (into ./wheels, about 40 MB). The set is the one that installed and ran there on
# 2026-11-28 (an image with Python 3.12, torch 2.11 + CUDA, accelerate, numpy, scipy, pillow,
# psutil, anyio, h11, einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py already present):
# the project's own pins (constraints.txt) for what that image lacks or has in another
# version, their missing dependencies (httpx2/httpcore2 need truststore), setuptools >= 77 for
# `pip install -e .` (PEP 639 licence field), and DeepSpeed's source archive with pydantic.
#
#     bash benchmarks/gpu_wheels.sh [PYVER]        # PYVER: the GPU machine's Python, e.g. 3.12
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
