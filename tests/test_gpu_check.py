"""benchmarks/gpu_check.py end to end with ``--tiny`` on CPU: every stage recorded with a
status, the trainers' it/s and FLOPs finite and positive, generation images/s, the FSDP stage
skipped with its reason, the ZeRO-2 stage skipped saying what to add to ./wheels when
deepspeed is missing, results.md with one table row per stage; a failing stage is recorded
with its traceback while the script goes on. Also the trainer side of the ZeRO-2 stage
(Trainer under accelerate's DeepSpeed plugin, with a stand-in accelerator): the micro-batch
size handed to the plugin, gradient accumulation and a second trained network refused."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

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
         "train_sdxl_lcd_lora", "train_sd3_dmd2_lora"]
LAUNCH = ["fsdp_launch", "fsdp_launch_dmd2_nogan", "fsdp_launch_pretrain", "zero2_launch"]
GEN = ["gen_lcm_1step", "gen_lcm_4step", "gen_ddim_4step_teacher"]


def test_tiny_run_writes_complete_results(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    # the skip path of zero2_launch whether or not this machine has deepspeed
    real = gc._module_available
    monkeypatch.setattr(gc, "_module_available", lambda name: name != "deepspeed" and real(name))
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
    expected = ["build_models", *LAUNCH, *TRAIN, "gen_load_teacher", *GEN]
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
    sd3 = stages["train_sd3_dmd2_lora"]  # the MMDiT, LoRA, with the GAN head on it
    assert sd3["model"] == "sd3" and sd3["adapter"] == "lora" and sd3["method"] == "dmd2"
    assert sd3["gradient_checkpointing"] is True and "loss_fake" in sd3["last_logs"]
    for name in GEN:
        s = stages[name]
        assert s["status"] == "ok"
        assert math.isfinite(s["images_per_s"]) and s["images_per_s"] > 0
        assert s["images_per_s"] == pytest.approx(s["batch_size"] / s["s_per_batch"])
        assert s["images_shape"] == [s["batch_size"], 3, 32, 32]
    assert stages["gen_ddim_4step_teacher"]["guidance_scale"] == 7.5
    assert stages["fsdp_launch"]["status"] == "skipped"
    assert stages["fsdp_launch"]["reason"] == "FSDP needs CUDA + NCCL"
    zero2 = stages["zero2_launch"]
    assert zero2["status"] == "skipped"
    assert zero2["reason"] == ("deepspeed not installed (add it to ./wheels with "
                               "benchmarks/gpu_prepare.sh; see benchmarks/gpu_check.sh)")

    md = (out / "results.md").read_text()
    header = [ln for ln in md.splitlines() if ln.startswith("| stage |")]
    assert len(header) == 1
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| stage")]
    assert [r.split("|")[1].strip() for r in rows] == expected
    zero2_row = next(r for r in rows if r.startswith("| zero2_launch |"))
    assert "| skipped |" in zero2_row and "deepspeed not installed (add it to ./wheels with" in zero2_row
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


def test_launch_stages_share_one_function_and_check_in_order(gc, monkeypatch):
    assert list(gc.LAUNCHES) == LAUNCH
    assert gc._module_available("json") and not gc._module_available("no_such_module_dd")
    monkeypatch.setattr(gc, "_module_available", lambda name: True)  # deepspeed "installed"
    cpu = SimpleNamespace(cuda=False, tiny=False, sd_dir=Path("x"))
    gpu_tiny = SimpleNamespace(cuda=True, tiny=True, sd_dir=Path("x"))
    gpu_no_models = SimpleNamespace(cuda=True, tiny=False, sd_dir=None)
    assert gc.launch_stage(cpu, "zero2_launch") == {
        "status": "skipped", "reason": "DeepSpeed ZeRO-2 needs CUDA + NCCL"}
    assert gc.launch_stage(gpu_tiny, "zero2_launch")["reason"] == "--tiny run"
    assert gc.launch_stage(gpu_no_models, "zero2_launch")["reason"] == "build_models failed"
    assert gc.launch_stage(cpu, "fsdp_launch")["reason"] == "FSDP needs CUDA + NCCL"
    monkeypatch.setattr(gc, "_module_available", lambda name: False)
    assert gc.launch_stage(gpu_no_models, "fsdp_launch")["reason"] == "build_models failed"
    assert gc.launch_stage(gpu_no_models, "zero2_launch")["reason"].startswith(
        "deepspeed not installed")


def test_accelerate_configs_of_the_launch_stages(gc):
    for config, _, _, _, _ in gc.LAUNCHES.values():
        assert (ROOT / "configs" / "accelerate" / config).is_file()
    # FSDP runs DMD2 (full SDXL weights need sharding); DeepSpeed a one-network method
    assert [v[3] for v in gc.LAUNCHES.values()] == ["dmd2", "dmd2", "pretrain", "lcd"]
    assert gc.LAUNCHES["fsdp_launch_dmd2_nogan"][4]["dmd2"]["gan_generator_weight"] == 0
    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    ds = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED"
    assert ds["deepspeed_config"]["zero_stage"] == 2
    # what Trainer accepts under DeepSpeed: no gradient accumulation inside the engine
    assert ds["deepspeed_config"]["gradient_accumulation_steps"] == 1


# --- the trainer under accelerate's DeepSpeed plugin (stand-in accelerator) -------------------
class _DeepSpeedStandIn:
    """What Trainer reads from an accelerate ``Accelerator`` launched with a DeepSpeed config."""

    def __init__(self, ds_config: dict):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.device, self.process_index, self.num_processes = torch.device("cpu"), 0, 1
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config))
        self.prepared = []

    def prepare(self, *objs):
        self.prepared.append(objs)
        return objs

    def unwrap_model(self, module):
        return module


def _pretrain_cfg(tmp_path, **train):
    from diffdistill.trainers.pretrain import PretrainConfig

    from diffdistill.config import build_config

    return build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"path": str(tmp_path / "model")},
        "data": {"kind": "fashion_mnist", "resolution": 16, "limit": 8},
        "train": {"max_steps": 1, "batch_size": 3, **train},
        "log": {"progress": False, "tensorboard": False},
    })


def test_trainer_gives_deepspeed_its_micro_batch_and_one_network(tmp_path):
    from diffdistill.trainers.pretrain import PretrainTrainer

    from diffdistill.config import ConfigError

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2}}
    acc = _DeepSpeedStandIn(ds)
    tr = PretrainTrainer(_pretrain_cfg(tmp_path), accelerator=acc)
    # accelerate refuses prepare() without a DataLoader unless this is an integer
    assert ds["train_micro_batch_size_per_gpu"] == 3
    net = tr.add_optimizer("unet", torch.nn.Linear(2, 2))
    assert isinstance(net, torch.nn.Linear) and len(acc.prepared) == 1
    with pytest.raises(ConfigError, match=r"several networks \(unet, fake_score\).*DeepSpeed"):
        tr.add_optimizer("fake_score", torch.nn.Linear(2, 2))
    assert len(acc.prepared) == 1 and list(tr.optimizers) == ["unet"]
    # an integer the user set in the DeepSpeed config is kept
    ds2 = {"train_micro_batch_size_per_gpu": 7, "gradient_accumulation_steps": "auto"}
    PretrainTrainer(_pretrain_cfg(tmp_path), accelerator=_DeepSpeedStandIn(ds2))
    assert ds2["train_micro_batch_size_per_gpu"] == 7


@pytest.mark.parametrize("grad_accum, ds_accum", [(2, 1), (1, 4)])
def test_trainer_refuses_gradient_accumulation_under_deepspeed(tmp_path, grad_accum, ds_accum):
    from diffdistill.trainers.pretrain import PretrainTrainer

    from diffdistill.config import ConfigError

    acc = _DeepSpeedStandIn({"train_micro_batch_size_per_gpu": "auto",
                             "gradient_accumulation_steps": ds_accum})
    with pytest.raises(ConfigError, match=f"train.grad_accum={grad_accum} .*"
                                          f"gradient_accumulation_steps={ds_accum}"):
        PretrainTrainer(_pretrain_cfg(tmp_path, grad_accum=grad_accum), accelerator=acc)


def test_trainer_without_deepspeed_is_unchanged(tmp_path):
    from diffdistill.trainers.pretrain import PretrainTrainer

    tr = PretrainTrainer(_pretrain_cfg(tmp_path, grad_accum=2, cpu=True))
    assert not tr._is_deepspeed()
    tr.add_optimizer("a", torch.nn.Linear(2, 2))
    tr.add_optimizer("b", torch.nn.Linear(2, 2))  # several networks: fine without DeepSpeed
    assert list(tr.optimizers) == ["a", "b"]


def test_train_batch_option_sets_the_sd15_batch(gc, tmp_path):
    res = gc.main(["--tiny", "--cpu", "--out", str(tmp_path), "--only", "train_lcd_lora",
                   "--train-batch", "3"])
    assert list(res["stages"]) == ["build_models", "train_lcd_lora"]
    s = res["stages"]["train_lcd_lora"]
    assert s["status"] == "ok" and s["batch_size"] == 3


def test_compile_option_reaches_every_train_stage(gc, tmp_path):
    """``--compile`` sets train.compile in each train stage's config (compiled training itself
    is tested in tests/test_compile.py; the stage counts FLOPs with compilation off)."""
    for flag in (False, True):
        ctx = SimpleNamespace(tiny=True, bf16=False, cuda=False, res_sd=32, res_sdxl=32,
                              sd_dir=tmp_path / "sd15", sdxl_dir=tmp_path / "sdxl",
                              sd3_dir=tmp_path / "sd3",
                              args=SimpleNamespace(compile=flag, train_batch=2))
        for name, case in gc._train_cases(ctx).items():
            assert gc._trainer_config(ctx, case, tmp_path / name)["train"]["compile"] is flag


def test_launch_stage_command_config_and_environment(gc, tmp_path, monkeypatch):
    """What a launch stage runs, with accelerate stubbed out (the real launch needs CUDA)."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return SimpleNamespace(returncode=0, stderr="the whole stderr", stdout="")

    monkeypatch.setattr(gc.subprocess, "run", fake_run)
    monkeypatch.setattr(gc, "_module_available", lambda name: True)
    ctx = SimpleNamespace(cuda=True, tiny=False, bf16=True, sd_dir=tmp_path / "sd15",
                          sdxl_dir=tmp_path / "sdxl", sd3_dir=tmp_path / "sd3", res_sd=512,
                          res_sdxl=1024, tmp=tmp_path, out_dir=tmp_path,
                          args=SimpleNamespace(launch_timeout=7, compile=False))
    for name in gc.LAUNCHES:
        res = gc.launch_stage(ctx, name)
        cmd, kw = calls[-1]
        config, what, _, method, over = gc.LAUNCHES[name]
        assert res["returncode"] == 0 and "status" not in res and res["method"] == method
        assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file",
                            str(gc.REPO / "configs" / "accelerate" / config)]
        assert cmd[5:7] == ["--num_processes", "1"] and kw["timeout"] == 7
        run_cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        assert run_cfg["method"] == method and run_cfg["adapter"]["type"] == "full"
        assert run_cfg["train"]["max_steps"] == 1 and "cpu" not in run_cfg["train"]
        assert run_cfg["train"]["mixed_precision"] == "bf16"
        for section, values in over.items():
            assert {k: run_cfg[section][k] for k in values} == values
        # FSDP launches run with synchronous kernels; the others unchanged
        assert (kw["env"].get("CUDA_LAUNCH_BLOCKING") == "1") == (what == "FSDP")
        assert (tmp_path / f"{name}.stderr.txt").read_text() == "the whole stderr"
    assert [c[0][-1].rsplit("/", 1)[-1] for c in calls] == [
        "fsdp_launch_dmd2_full.yaml", "fsdp_launch_dmd2_nogan_dmd2_full.yaml",
        "fsdp_launch_pretrain_pretrain_full.yaml", "zero2_launch_lcd_full.yaml"]
