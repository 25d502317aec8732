"""A catalogue of bad inputs: each gives one clear message (or a counted skip), never a
silent wrong result. Method-specific cases live beside their trainers' tests and are
listed at the bottom of this file."""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffdistill.trainers.checkpointing import list_checkpoints
from diffdistill.trainers.pretrain import PretrainConfig, PretrainTrainer
from PIL import Image

from diffdistill.config import ConfigError, build_config
from diffdistill.errors import RunError


def cfg_for(model_dir, out, data=None, **train):
    return build_config(PretrainConfig, {
        "method": "pretrain", "output_dir": str(out), "model": {"path": str(model_dir)},
        "data": data or {"kind": "fashion_mnist", "resolution": 16, "limit": 32},
        "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 1, "cpu": True, **train},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })


# -- configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("data, needle", [
    ({"train": {"lrr": 1}}, "train.lrr"),  # unknown key
    ({"train": {"batch_size": "many"}}, "train.batch_size"),  # wrong type
    ({"adapter": {"type": "lora", "rank": 0}}, "adapter.rank"),  # lora rank <= 0
    ({"adapter": {"type": "lora", "rank": -4}}, "adapter.rank"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({"data": {"kind": "parquet"}}, "data.kind"),
])
def test_config_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config(PretrainConfig, {"method": "pretrain", **data})


# -- model folders --------------------------------------------------------------------------

def test_model_folder_missing(tmp_path):
    t = PretrainTrainer(cfg_for(tmp_path / "nope", tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="nope"):
        t.setup()


def test_hub_id_is_refused_offline(tmp_path):
    t = PretrainTrainer(cfg_for("stabilityai/sdxl-turbo", tmp_path / "o"))
    with pytest.raises(Exception, match="download"):
        t.setup()


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.txt").write_text("hello")
    t = PretrainTrainer(cfg_for(tmp_path / "junk", tmp_path / "o"))
    with pytest.raises(Exception, match="not a diffusers pipeline"):
        t.setup()


def test_sdxl_folder_given_to_an_sd_only_config(sdxl_dir, tmp_path):
    cfg = cfg_for(sdxl_dir, tmp_path / "o", data={"kind": "fashion_mnist", "resolution": 32,
                                                   "limit": 8})
    cfg.model.kind = "sd"
    with pytest.raises(ConfigError, match="sdxl"):
        PretrainTrainer(cfg).setup()


def test_unknown_prediction_type(pixel_dir, tmp_path):
    bad = tmp_path / "badpred"
    shutil.copytree(pixel_dir, bad)
    sc = bad / "scheduler" / "scheduler_config.json"
    conf = json.loads(sc.read_text())
    conf["prediction_type"] = "flow"
    sc.write_text(json.dumps(conf))
    with pytest.raises(Exception, match="prediction_type"):
        PretrainTrainer(cfg_for(bad, tmp_path / "o")).setup()
    fixed = cfg_for(bad, tmp_path / "o2")
    fixed.model.prediction_type = "epsilon"  # the documented override for a mislabelled folder
    t = PretrainTrainer(fixed)
    t.setup()
    assert t.backbone.prediction_type == "epsilon"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/diffdistill-pwned",))


def test_pickle_with_payload_is_refused(pixel_dir, tmp_path):
    """Weights come only from safetensors or torch.load(weights_only=True)."""
    if os.path.exists("/tmp/diffdistill-pwned"):
        os.remove("/tmp/diffdistill-pwned")
    evil = tmp_path / "evil"
    shutil.copytree(pixel_dir, evil)
    for f in (evil / "unet").glob("*.safetensors"):
        f.unlink()
    with open(evil / "unet" / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    # diffusers reads a .bin with torch.load(weights_only=True), which refuses the payload; the
    # toolkit turns its OSError into one line naming the folder
    with pytest.raises(ConfigError, match="unet cannot be loaded.*Unable to load weights"):
        PretrainTrainer(cfg_for(evil, tmp_path / "o")).setup()
    assert not os.path.exists("/tmp/diffdistill-pwned")
    from diffdistill.eval.features import load_state_dict_file

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict_file(evil / "unet" / "diffusion_pytorch_model.bin")
    assert not os.path.exists("/tmp/diffdistill-pwned")


# -- data ---------------------------------------------------------------------------------

def test_empty_dataset_folder(pixel_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = cfg_for(pixel_dir, tmp_path / "o", data={"kind": "classfolder", "resolution": 16,
                                                    "path": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="empty"):
        PretrainTrainer(cfg).setup()


def _folder_with_bad_images(root: Path) -> Path:
    d = root / "imgs" / "bag"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "corrupt.png").write_bytes(b"not an image at all")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(d / "c.jpg")
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(d / "g16.png")
    return root / "imgs"


def test_corrupt_images_are_skipped_and_counted_modes_converted(tmp_path):
    from diffdistill.data import ClassFolder

    ds = ClassFolder(_folder_with_bad_images(tmp_path), resolution=16)
    items = [ds[i] for i in range(len(ds))]
    assert ds.skipped.count >= 1 and any("corrupt" in str(p) for p in ds.skipped.paths)
    for it in items:
        assert it["pixel_values"].shape == (3, 16, 16)
        assert torch.isfinite(it["pixel_values"]).all()
        assert -1.0 <= float(it["pixel_values"].min()) and float(it["pixel_values"].max()) <= 1.0


def test_empty_and_overlong_captions(sd_dir, tmp_path):
    from diffdistill.backbone import load_backbone
    from diffdistill.data import ImageCaptionFolder

    d = tmp_path / "cap"
    d.mkdir()
    for i, cap in enumerate(["", "word " * 500]):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(cap)
    ds = ImageCaptionFolder(d, resolution=32)
    caps = [ds[i]["caption"] for i in range(2)]
    assert ds.empty_captions >= 1
    bb = load_backbone(sd_dir)
    cond = bb.encode_prompts(caps, with_uncond=False)  # the tokenizer truncates to 77
    assert cond.encoder_hidden_states.shape[1] == 77


def test_resolution_not_divisible_by_vae_factor(sd_dir, tmp_path):
    cfg = cfg_for(sd_dir, tmp_path / "o", data={"kind": "fashion_mnist", "resolution": 33,
                                                "limit": 8})
    with pytest.raises(ConfigError, match="data.resolution"):
        PretrainTrainer(cfg).setup()


def test_batch_larger_than_dataset(pixel_dir, tmp_path):
    cfg = cfg_for(pixel_dir, tmp_path / "o", data={"kind": "fashion_mnist", "resolution": 16,
                                                   "limit": 3})
    with pytest.raises(ValueError, match="batch_size"):
        PretrainTrainer(cfg).fit()


# -- outputs and checkpoints ----------------------------------------------------------------

def test_output_folder_not_writable(pixel_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(ConfigError, match="not writable"):
        PretrainTrainer(cfg_for(pixel_dir, blocker / "run")).setup()


def test_disk_full_during_checkpoint_keeps_previous(pixel_dir, tmp_path):
    out = tmp_path / "full"
    t = PretrainTrainer(cfg_for(pixel_dir, out, max_steps=3))
    real = t.accelerator.save_state
    calls = []

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    t.accelerator.save_state = failing
    with pytest.raises(RunError, match="checkpoint-1 is intact") as caught:
        t.fit()
    assert isinstance(caught.value.__cause__, OSError)  # the reason, shown by -v
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # and the intact checkpoint resumes
    t2 = PretrainTrainer(cfg_for(pixel_dir, out, max_steps=3))
    t2.setup(resume="latest")
    assert t2.global_step == 1


def test_resume_from_other_method(pixel_dir, tmp_path):
    out = tmp_path / "r"
    PretrainTrainer(cfg_for(pixel_dir, out, max_steps=1)).fit()
    state = list_checkpoints(out)[-1] / "trainer_state.json"
    meta = json.loads(state.read_text())
    meta["method"] = "dmd2"
    state.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="dmd2"):
        PretrainTrainer(cfg_for(pixel_dir, out, max_steps=2)).setup(resume="latest")
    with pytest.raises(FileNotFoundError, match="not a diffdistill checkpoint"):
        PretrainTrainer(cfg_for(pixel_dir, out, max_steps=2)).setup(resume=str(tmp_path))


def test_resume_with_another_process_count_is_refused(pixel_dir, tmp_path):
    """A checkpoint holds one generator per writing rank: resuming it with more or fewer
    processes would silently change noise and data order."""
    import shutil

    out = tmp_path / "w"
    PretrainTrainer(cfg_for(pixel_dir, out, max_steps=1)).fit()
    ck = list_checkpoints(out)[-1]
    # as if written by 2 processes, resumed by 1
    shutil.copy(ck / "trainer_rng_0.safetensors", ck / "trainer_rng_1.safetensors")
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        PretrainTrainer(cfg_for(pixel_dir, out, max_steps=2)).setup(resume="latest")


def test_damaged_checkpoint_names_itself_and_an_older_one(pixel_dir, tmp_path):
    """A checkpoint damaged after it was written (disk error, a copy cut short) fails naming
    the folder and the previous checkpoint, not with a bare deserialisation error."""
    out = tmp_path / "d"
    PretrainTrainer(cfg_for(pixel_dir, out, max_steps=2)).fit()
    ck1, ck2 = list_checkpoints(out)
    weights = ck2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"checkpoint {ck2} cannot be read .*SafetensorError"
                                           f".*--resume {ck1}"):
        PretrainTrainer(cfg_for(pixel_dir, out, max_steps=3)).setup(resume="latest")
    (ck1 / "trainer_state.json").write_text('{"method": "pretr')
    with pytest.raises(RuntimeError, match=f"checkpoint {ck1} cannot be read .*JSONDecodeError"):
        PretrainTrainer(cfg_for(pixel_dir, out, max_steps=3)).setup(resume=str(ck1))


# -- sampling ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_lora(sd_dir, tmp_path_factory):
    from diffdistill.adapters import make_trainable
    from diffdistill.backbone import load_backbone
    from diffdistill.export import save_lora

    bb = load_backbone(str(sd_dir))
    make_trainable(bb.unet, adapter="lora", rank=4)
    return save_lora(bb.unet, tmp_path_factory.mktemp("sd-lora"), kind="sd").parent


def test_lora_for_a_different_base_in_sample(sd_dir, sdxl_dir, sd_lora, tmp_path, capsys):
    from diffdistill.cli import main

    sample = ["--num", "1", "--steps", "1", "--sampler", "ddim", "--prompt", "a bag"]
    assert main(["sample", str(sd_dir), "--lora", str(sd_lora), "--out",
                 str(tmp_path / "ok.png"), *sample]) == 0  # its own base: fine
    capsys.readouterr()
    assert main(["sample", str(sdxl_dir), "--lora", str(sd_lora), "--out",
                 str(tmp_path / "bad.png"), *sample]) == 2
    err = capsys.readouterr().err
    assert f"error: --lora {sd_lora} does not fit this base model" in err
    assert "trained on a different base" in err and not (tmp_path / "bad.png").exists()


def test_lora_folder_without_the_weights_file(sd_dir, tmp_path, capsys):
    from diffdistill.cli import main

    (tmp_path / "nolora").mkdir()
    assert main(["sample", str(sd_dir), "--lora", str(tmp_path / "nolora"), "--out",
                 str(tmp_path / "x.png"), "--num", "1"]) == 2
    assert "no pytorch_lora_weights.safetensors in that folder" in capsys.readouterr().err


# -- weights for metrics ------------------------------------------------------------------------

def test_inception_weights_missing_or_wrong(tmp_path, monkeypatch):
    from diffdistill.eval.inception import InceptionV3FID

    monkeypatch.delenv("DIFFDISTILL_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        InceptionV3FID()
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(wrong))
    with pytest.raises(Exception, match="(?i)missing|unexpected|key"):
        InceptionV3FID(weights_path=wrong)


def test_clip_weights_missing(tmp_path):
    from diffdistill.eval.clip_detector import ClipDetector

    with pytest.raises(FileNotFoundError):
        ClipDetector("ViT-B-32", pretrained_path=tmp_path / "none.safetensors")


def test_clip_weights_wrong_file(tmp_path):
    from diffdistill.eval.clip_detector import ClipDetector
    from safetensors.torch import save_file
    from standins import TINY_CLIP, make_tiny_clip

    cfg_file, weights, _ = make_tiny_clip(tmp_path)
    assert ClipDetector(TINY_CLIP, pretrained_path=weights, config_path=cfg_file)  # right file
    wrong = tmp_path / "not_clip.safetensors"
    save_file({"x": torch.zeros(2)}, str(wrong))
    with pytest.raises(Exception, match="(?i)missing key"):
        ClipDetector(TINY_CLIP, pretrained_path=wrong, config_path=cfg_file)


# -- cases tested beside their subject (not repeated here) -----------------------------------
# f-distill without its GAN term: test_fdistill.py::test_config_without_gan_is_rejected
# DMD2 GAN without real images (data.kind=prompts): test_dmd2.py::test_prompts_only_data_with_gan_is_rejected
# NaN/Inf loss, skip then stop naming the last good checkpoint:
#     test_trainer.py::test_nonfinite_loss_skips_then_stops_naming_checkpoint
# resume under another config (adapter/model): test_trainer.py::test_resume_rejects_other_config
# bench with fewer reference images (or captions) than num_samples:
#     test_bench.py::test_bench_config_shorthands_and_early_errors
# reference statistics from another extractor / resolution / resize mode / count:
#     test_eval_fid.py::test_stats_save_load_and_metadata_checks,
#     test_eval_harness.py::test_reference_folder_coco_protocol_cache_and_refusal,
#     test_eval_harness.py::test_trainer_periodic_eval_logs_the_harness_metric
# image modes (CMYK, alpha, 16-bit, palette), corrupt files counted and logged:
#     test_data.py::test_mode_conversion, ::test_palette_images_with_and_without_transparency,
#     ::test_corrupt_file_is_skipped_counted_and_logged, ::test_all_files_corrupt_raises
# a killed run / a half-written checkpoint: test_crash_resume.py


def test_bench_refuses_a_missing_model_before_reference_features(tmp_path, monkeypatch):
    """A bench entry whose folder does not exist fails in one line before any reference
    statistics are computed (minutes with the EfficientNet detector)."""
    import diffdistill.eval.harness as harness

    from diffdistill.config import ConfigError, build_config

    def no_reference(*a, **k):
        raise AssertionError("reference statistics computed before the model check")

    monkeypatch.setattr(harness, "reference_statistics", no_reference)
    cfg = build_config(harness.BenchConfig, {
        "models": [{"name": "teacher", "path": "world:teacher_latent", "steps": [1]},
                   {"name": "student", "path": str(tmp_path / "nope"), "steps": [1]}],
        "num_samples": 8, "out": str(tmp_path / "b")})
    with pytest.raises(ConfigError, match=r"models\[1\]\.path=.*nope.*\(student\) does not exist"):
        harness.run_bench(cfg)
    lora = tmp_path / "lora"  # a LoRA export passed as the model: say how to load it
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    cfg.models[1].path = str(lora)
    with pytest.raises(ConfigError, match=r"models\[1\]\.path \(student\): .*lora.* is a LoRA "
                                          r"export, not a model: .*lora: "):
        harness.run_bench(cfg)
    cfg.models[1].path = str(tmp_path)  # a folder, but no model in it
    with pytest.raises(ConfigError, match=r"models\[1\]\.path \(student\): .* is not a diffusers"):
        harness.run_bench(cfg)


ROOT = Path(__file__).resolve().parents[1]


def test_training_on_an_empty_or_missing_image_folder_is_one_line(tmp_path, capsys):
    from diffdistill.cli import main

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        code = main(["train", str(ROOT / "configs" / "dmd2" / "toy.yaml"),
                     f"output_dir={tmp_path / 'o'}", "data.kind=imagefolder",
                     f"data.path={folder}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "data.path=" in err, err


def test_a_corrupt_weight_file_is_one_line(tmp_path, capsys):
    import shutil

    from diffdistill.cli import main
    from diffdistill.world import asset_path

    model = tmp_path / "model"
    shutil.copytree(asset_path("teacher_latent"), model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    code = main(["train", str(ROOT / "configs" / "dmd2" / "toy.yaml"), f"model.path={model}",
                 f"output_dir={tmp_path / 'o'}", "data.limit=64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "unet cannot be loaded" in err and "damaged" in err


def test_zero_steps_is_refused(capsys):
    from diffdistill.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "world:teacher_latent", "--steps", "0"])
    assert "must be >= 1, got 0" in capsys.readouterr().err
