"""benchmarks/gpu_check.py end to end with ``--tiny`` on CPU: every stage recorded with a
status, the trainers' it/s and FLOPs finite and positive, generation images/s, the FSDP stage
skipped with its reason, results.md with one table row per stage; and a failing stage is
recorded with its traceback while the script goes on."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    return _load()


TRAIN = ["train_lcd_lora", "train_dmd2_lora", "train_dmd2_full", "train_fdistill_lora",
         "train_sdxl_lcd_lora"]
GEN = ["gen_lcm_1step", "gen_lcm_4step", "gen_ddim_4step_teacher"]


def test_tiny_run_writes_complete_results(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    ret = gc.main(["--tiny", "--cpu"])
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    assert res["tiny"] is True and ret["tiny"] is True
    for key in ("date", "device", "device_name", "torch", "diffusers"):
        assert res["env"][key], key
    assert res["env"]["device"] == "cpu"
    for key in ("it_per_s", "images_per_s", "peak_mem_gib", "mfu", "flops_per_step"):
        assert key in res["units"]
    stages = res["stages"]
    expected = ["build_models", *TRAIN, "gen_load_teacher", *GEN, "fsdp_launch"]
    assert list(stages) == expected
    for name, s in stages.items():
        assert s["status"] in ("ok", "skipped", "error"), name
        assert s["status"] != "error", (name, s.get("error"))
    for name in TRAIN:
        s = stages[name]
        assert s["status"] == "ok"
        assert math.isfinite(s["it_per_s"]) and s["it_per_s"] > 0
        assert s["s_per_step"] == pytest.approx(1.0 / s["it_per_s"])
        assert math.isfinite(s["flops_per_step"]) and s["flops_per_step"] > 0
        assert s["mfu"] is None  # CPU: no peak to divide by
        assert s["resolution"] == 32 and s["precision"] == "fp32"
        assert "peak_rss_delta_gib" in s and "peak_mem_gib" not in s
    assert stages["train_sdxl_lcd_lora"]["gradient_checkpointing"] is True
    assert stages["train_sdxl_lcd_lora"]["model"] == "sdxl"
    assert stages["train_dmd2_full"]["adapter"] == "full"
    for name in GEN:
        s = stages[name]
        assert s["status"] == "ok"
        assert math.isfinite(s["images_per_s"]) and s["images_per_s"] > 0
        assert s["images_per_s"] == pytest.approx(s["batch_size"] / s["s_per_batch"])
        assert s["images_shape"] == [s["batch_size"], 3, 32, 32]
    assert stages["gen_ddim_4step_teacher"]["guidance_scale"] == 7.5
    assert stages["fsdp_launch"]["status"] == "skipped"
    assert "CUDA" in stages["fsdp_launch"]["reason"]

    md = (out / "results.md").read_text()
    header = [ln for ln in md.splitlines() if ln.startswith("| stage |")]
    assert len(header) == 1
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    assert [r.split("|")[1].strip() for r in rows] == expected
    lcd_row = next(r for r in rows if r.startswith("| train_lcd_lora |"))
    assert "CPU RSS" in lcd_row
    assert f"{stages['train_lcd_lora']['it_per_s']:.3g}" in lcd_row


def test_failing_stage_is_recorded_and_reported(gc):
    results = {"stages": {}}

    def boom():
        raise RuntimeError("deliberate failure xyz")

    gc.run_stage(results, "bad", boom)
    gc.run_stage(results, "good", lambda: {"it_per_s": 2.0, "resolution": 32})
    bad, good = results["stages"]["bad"], results["stages"]["good"]
    assert bad["status"] == "error" and "deliberate failure xyz" in bad["error"]
    assert "Traceback" in bad["error"] and bad["wall_s"] >= 0
    assert good["status"] == "ok" and good["it_per_s"] == 2.0
    results.update(tiny=True, env={"device_name": "cpu", "device": "cpu", "date": "d",
                                   "torch": "t", "diffusers": "x", "peak_bf16_flops": None})
    md = gc.markdown(results)
    assert "| bad | error |" in md and "RuntimeError: deliberate failure xyz" in md
    assert "| good | ok | 32 |" in md


def test_mfu_peak_table_covers_h100_h200(gc):
    assert gc.PEAK_BF16["H100"] == 989e12 and gc.PEAK_BF16["H200"] == 989e12
