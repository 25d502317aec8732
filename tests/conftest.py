"""Shared fixtures: tiny stock-diffusers pipelines saved once per test session.

Each fixture builds one pipeline from configs (no download), saves it with safetensors into
a session temporary folder and returns the folder's path. They are cheap (well under a
second each after the one-time ``diffusers`` import) and read-only: tests that need to
modify a model load their own copy from the folder.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")



@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """Tiny models run several times faster single-threaded on a 2-core machine (the
    OpenMP barrier spins otherwise, badly so when the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save(pipe, folder):
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """SD1.5-structured ``StableDiffusionPipeline`` (epsilon prediction, DDIM scheduler)."""
    from diffdistill.tiny import tiny_sd_pipeline

    return _save(tiny_sd_pipeline("epsilon"), tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sd_v_dir(tmp_path_factory):
    """The same structure with a v-prediction scheduler."""
    from diffdistill.tiny import tiny_sd_pipeline

    return _save(tiny_sd_pipeline("v_prediction", seed=1), tmp_path_factory.mktemp("tiny-sd-v"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """SDXL-structured ``StableDiffusionXLPipeline`` (two text encoders, pooled + time ids)."""
    from diffdistill.tiny import tiny_sdxl_pipeline

    return _save(tiny_sdxl_pipeline(), tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """SD3-structured ``StableDiffusion3Pipeline`` without T5 (MMDiT, two CLIP encoders)."""
    from diffdistill.tiny import tiny_sd3_pipeline

    return _save(tiny_sd3_pipeline(), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """Flux-structured ``FluxPipeline`` (CLIP + T5, packed latents, embedded guidance)."""
    from diffdistill.tiny import tiny_flux_pipeline

    return _save(tiny_flux_pipeline(), tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory):
    """Class-conditional pixel ``DDPMPipeline`` (10 classes + the null class)."""
    from diffdistill.tiny import tiny_pixel_pipeline

    return _save(tiny_pixel_pipeline(), tmp_path_factory.mktemp("tiny-pixel"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The world recipe at ``--scale tiny`` run once: (assets folder, work folder, world.json).
    Tests that run code reading ``world:NAME`` point ``$DIFFDISTILL_WORLD_DIR`` at it."""
    from diffdistill.app.world_build import build_world

    out = tmp_path_factory.mktemp("world") / "assets"
    work = out.parent / "work"
    info = build_world(scale="tiny", out=out, work=work, log=lambda m: None)
    return out, work, info
