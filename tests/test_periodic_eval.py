"""Every trainer hands its generator to the evaluation harness (``eval_spec``), and the
harness samples exactly what the trainer's own sample grid shows (same seeds, prompts,
sampler, timesteps and guidance) — so the periodic metric measures the generator that is
exported."""

import pytest
import torch
from diffdistill.eval.generation import generate_for_eval
from diffdistill.trainers import get_trainer_class

from diffdistill.config import build_config

CASES = {
    # method: (model fixture, resolution, extra config)
    "pretrain": ("pixel_dir", 16, {"pretrain": {"sample_steps": 3, "guidance_scale": 2.0},
                                   "eval": {"guidance_scale": 2.0}}),
    "ict": ("pixel_dir", 16, {}),
    "lcd": ("sd_dir", 32, {"adapter": {"type": "lora", "rank": 4}}),
    "dmd2": ("pixel_dir", 16, {"dmd2": {"timesteps": [999, 499]}}),
    "hypersd": ("sd_dir", 32, {"adapter": {"type": "lora", "rank": 4}}),
}


def _deep(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("method", sorted(CASES))
def test_eval_spec_samples_what_the_trainer_grid_shows(method, request, tmp_path):
    fixture, res, extra = CASES[method]
    cls = get_trainer_class(method)
    data = _deep({
        "method": method, "output_dir": str(tmp_path / method),
        "model": {"path": str(request.getfixturevalue(fixture))},
        "data": {"kind": "fashion_mnist", "resolution": res, "limit": 8},
        "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "cpu": True},
        "log": {"progress": False, "tensorboard": False, "grid_steps": 2},
    }, extra)
    trainer = cls(build_config(cls.config_class, data))
    trainer.setup()
    spec = trainer.eval_spec()
    assert spec is not None
    seeds = [0, 1, 2]
    grid = trainer.sample_images(seeds)
    if method == "ict":  # the iCT grid is the 1-step row, then the 2-step row
        expected = {1: grid[:3], 2: grid[3:]}
    elif method == "pretrain":  # the teacher grid uses pretrain.sample_steps
        expected = {3: grid}
    else:  # log.grid_steps (DMD2: its two training timesteps)
        expected = {2: grid}
    for steps, want in expected.items():
        got = generate_for_eval(spec, seeds, num_steps=steps, grid_samples=3, batch_size=16)
        assert got.grid.shape == want.shape
        diff = (got.grid.int() - want.int()).abs().max().item()
        assert diff <= 1, (method, steps, diff)
        assert float(want.float().std()) > 0
    assert torch.isfinite(torch.tensor(float(got.sec_per_image)))
