"""The embedded tiny world: the build recipe end to end at the test scale, and the shipped
assets (``diffdistill/world/assets``).

``test_shipped_*`` check the world that ships with the package. They FAIL (they do not
skip) when it has not been built, naming the command to run; they carry the
``world_assets`` marker so that a run can deselect them explicitly
(``pytest -m "not world_assets"``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.world import ASSETS_DIR

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors")


@pytest.fixture(scope="module")
def world(tiny_world):
    """The tiny-scale recipe run once (conftest ``tiny_world``): (out, work, world.json)."""
    return tiny_world


def _safetensors_dtypes(folder: Path) -> set:
    from safetensors import safe_open

    dtypes = set()
    for f in folder.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                if t.is_floating_point():
                    dtypes.add(t.dtype)
    return dtypes


def test_world_json_records_every_stage(world):
    from diffdistill.app.world_build import STAGE_SEED_OFFSET, STAGES

    out, _, info = world
    on_disk = json.loads((out / "world.json").read_text())
    assert on_disk["scale"] == "tiny" and on_disk["seed"] == 0
    assert list(on_disk["stages"]) == list(STAGES)
    for name, stage in on_disk["stages"].items():
        assert stage["wall_s"] >= 0 and stage["cpu_s"] >= 0, name
        assert stage["seed"] == STAGE_SEED_OFFSET[name], name  # seed * 1000 + stage offset
    # offsets are fixed per stage: adding the judge changed no other stage's seed
    assert [STAGE_SEED_OFFSET[s] for s in STAGES] == [1, 2, 3, 4, 5, 6, 8, 9, 7]
    acc = on_disk["accuracies"]
    assert set(acc) == {"fmnist_net_test_accuracy", "clip_zero_shot_test_accuracy",
                        "clip_judge_zero_shot_train_accuracy"}
    judge = on_disk["stages"]["clip_judge"]["metrics"]
    assert (judge["train_split"], judge["eval_split"]) == ("test", "train")
    assert on_disk["command"] == "diffdistill world build --scale tiny"
    assert on_disk["teachers"]["teacher_latent"]["rows"][0]["guidance_scale"] == 2.0
    assert {k: t["sampler"] for k, t in on_disk["teachers"].items()} == {
        "teacher_pixel": "ddim", "teacher_latent": "ddim", "teacher_flow": "flow_euler"}
    # the report measured exactly the shipped files, and nothing else is in the folder
    assert on_disk["total_bytes"] == sum(f.stat().st_size for f in out.rglob("*")
                                         if f.is_file() and f.name != "world.json")
    assert on_disk["stages"]["report"]["metrics"]["within_budget"]


def test_assets_are_fp16_safetensors_only(world):
    out, _, _ = world
    weights = [f for f in out.rglob("*") if f.suffix in WEIGHT_SUFFIXES]
    assert weights and all(f.suffix == ".safetensors" for f in weights), weights
    assert _safetensors_dtypes(out) == {torch.float16}
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in weights)  # world-readable
    # the compact tokenizer: vocab.json + merges.txt, not transformers' 3.6 MB tokenizer.json
    tok = out / "teacher_latent" / "tokenizer"
    assert (tok / "vocab.json").is_file() and not (tok / "tokenizer.json").exists()


def test_shipped_weights_are_the_trainer_export_in_fp16(world):
    """finalize: every tensor equals the PretrainTrainer's EMA export rounded to fp16."""
    from safetensors.torch import load_file

    out, work, _ = world
    for name in ("teacher_pixel", "teacher_latent"):
        exported = load_file(str(work / "train" / name / "export" / "unet"
                                 / "diffusion_pytorch_model.safetensors"))
        shipped = load_file(str(out / name / "unet" / "diffusion_pytorch_model.safetensors"))
        assert exported.keys() == shipped.keys()
        for k, v in exported.items():
            assert torch.equal(v.half(), shipped[k]), (name, k)


def test_latent_teacher_stock_pipeline_matches_shared_sampler(world):
    """Stock ``StableDiffusionPipeline.from_pretrained`` samples the folder (fp32) and gives
    the same image as the toolkit's sampler (DDIM, 2 steps, CFG 2, same seed)."""
    from diffusers import StableDiffusionPipeline

    from diffdistill.world.info import sample_teacher

    out, _, _ = world
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "teacher_latent"))
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert len(pipe.vae.config.block_out_channels) == 3  # factor 4: 8x8 latents
    assert pipe.unet.config.sample_size == 8
    seed = 3
    stock = pipe("a photo of a t-shirt", height=32, width=32, num_inference_steps=2,
                 guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
                 output_type="np").images[0]
    ours = sample_teacher(out / "teacher_latent", 1, steps=2, guidance_scale=2.0, seed=seed)
    ours = ours[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(stock * 255 - ours).max() <= 1.0 + 1e-6  # uint8 rounding only
    assert ours.std() > 0  # not a constant image


def test_pixel_teacher_loads_through_backbone(world):
    from diffdistill.backbone import load_backbone
    from diffdistill.world.info import sample_teacher

    out, _, info = world
    bb = load_backbone(out / "teacher_pixel")
    assert bb.kind == "pixel" and bb.pipeline_class == "DDPMPipeline"
    assert (bb.num_classes, bb.null_class) == (10, 10)
    assert bb.unet.config.num_class_embeds == 11 and bb.unet.config.sample_size == 32
    # init folder ε, trained as v (toy_pixel.yaml's pretrain.target): the export says v
    assert bb.prediction_type == "v_prediction" and bb.unet.dtype == torch.float32
    # no x0̂ clipping: DDIM's clamp keeps ε̂ and drifts the v teacher (docs/one_step.md)
    assert bb.scheduler_config["clip_sample"] is False and bb.sampler_options("ddim") == {}
    imgs = sample_teacher(None, 3, steps=2, guidance_scale=2.0, seed=1, backbone=bb)
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 32, 32)
    # batch composition does not change a sample (one seed per sample)
    again = sample_teacher(None, 1, steps=2, guidance_scale=2.0, seed=1, backbone=bb)
    assert (imgs[:1].int() - again.int()).abs().max() <= 1


def test_classifier_detector_on_uint8(world):
    from diffdistill.eval.features import get_detector

    from diffdistill.fmnist import fashion_mnist_uint8, load_fashion_mnist
    from diffdistill.world.classifier import FMNISTDetector, accuracy, load_fmnist_net

    out, _, info = world
    path = out / "fmnist_net.safetensors"
    det = get_detector("fmnist-net", weights_path=path)
    assert isinstance(det, FMNISTDetector) and det.name == "fmnist-net"
    test = fashion_mnist_uint8("test", 32, limit=32)
    feats = det(test)
    assert feats.dtype == torch.float32 and feats.shape == (32, det.feature_dim)
    # gray input: 1 channel or 3 replicated channels give the same features
    assert torch.equal(det(test[:, :1]), feats)
    # the features are the network's pooled activations on [-1, 1] gray inputs
    net = load_fmnist_net(path)
    manual = net.features(test[:, :1].float() / 127.5 - 1)
    torch.testing.assert_close(feats, manual, rtol=0, atol=1e-6)
    # other sizes are resized (28 px originals work)
    assert det(torch.from_numpy(np.array(load_fashion_mnist("test")[0][:2]))[:, None]).shape \
        == (2, det.feature_dim)
    # world.json's accuracy is the shipped file's, recomputable exactly
    labels = torch.from_numpy(load_fashion_mnist("test")[1][:32].copy())
    assert accuracy(net, test, labels) == info["accuracies"]["fmnist_net_test_accuracy"]


def test_clip_loads_through_open_clip(world):
    import open_clip

    from diffdistill.fmnist import fashion_mnist_uint8, load_fashion_mnist
    from diffdistill.world.clip import MODEL_NAME, WEIGHTS_FILE, load_clip_model, zero_shot_accuracy

    out, _, info = world
    folder = out / "clip"
    open_clip.add_model_config(str(folder / f"{MODEL_NAME}.json"))
    model = open_clip.create_model(MODEL_NAME, pretrained=str(folder / WEIGHTS_FILE))
    assert next(model.parameters()).dtype == torch.float32
    assert model.visual.__class__.__name__ == "ModifiedResNet"
    # the hub-style folder form loads the same weights
    same = open_clip.create_model(f"local-dir:{folder}")
    for (k, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k
    model2, _, tok = load_clip_model(folder)
    test = fashion_mnist_uint8("test", 32, limit=32)
    labels = torch.from_numpy(load_fashion_mnist("test")[1][:32].copy())
    acc = zero_shot_accuracy(model2, tok, test, labels)
    assert acc == info["accuracies"]["clip_zero_shot_test_accuracy"]


def test_clip_judge_is_another_network_trained_on_other_images(world):
    import open_clip

    from diffdistill.fingerprint import weights_sha256
    from diffdistill.fmnist import fashion_mnist_uint8, load_fashion_mnist
    from diffdistill.world.clip import (
        JUDGE_MODEL_NAME,
        WEIGHTS_FILE,
        load_clip_model,
        zero_shot_accuracy,
    )

    out, _, info = world
    folder = out / "clip_judge"
    judge, _, tok = load_clip_model(folder)
    reward, _, _ = load_clip_model(out / "clip")
    assert judge.visual.__class__.__name__ == "VisionTransformer"  # the reward: a ResNet
    assert reward.visual.__class__.__name__ == "ModifiedResNet"
    assert open_clip.create_model(f"local-dir:{folder}").visual.__class__.__name__ == \
        "VisionTransformer"
    assert (folder / f"{JUDGE_MODEL_NAME}.json").is_file()
    assert weights_sha256(folder / WEIGHTS_FILE) != weights_sha256(out / "clip" / WEIGHTS_FILE)
    # trained on the test split, so its accuracy is measured on training images
    train = fashion_mnist_uint8("train", 32, limit=32)
    labels = torch.from_numpy(load_fashion_mnist("train")[1][:32].copy())
    acc = zero_shot_accuracy(judge, tok, train, labels)
    assert acc == info["accuracies"]["clip_judge_zero_shot_train_accuracy"]
    from diffdistill.world import world_clip_judge_detector

    det = world_clip_judge_detector(folder)
    assert det.model_name == JUDGE_MODEL_NAME and Path(det.weights_path) == folder / WEIGHTS_FILE


def test_ref_stats_metadata_and_values(world):
    from diffdistill.eval.fid import FeatureStats

    from diffdistill.fmnist import fashion_mnist_uint8
    from diffdistill.world import load_ref_stats, world_clip_detector
    from diffdistill.world.classifier import FMNISTDetector

    out, _, _ = world
    test = fashion_mnist_uint8("test", 32, limit=32)
    dets = {"fmnist-net": FMNISTDetector(out / "fmnist_net.safetensors"),
            "clip": world_clip_detector(out / "clip")}
    for key, det in dets.items():
        stats = load_ref_stats(key, out, extractor=det.name, resize_mode=det.resize_mode,
                               resolution=32, count=32, source="fashion-mnist/test")
        feats = det(test).double()
        torch.testing.assert_close(stats.mean(), feats.mean(0), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(stats.cov(), torch.cov(feats.T), rtol=1e-5, atol=1e-8)
        with pytest.raises(ValueError, match="resolution"):
            FeatureStats.load(out / "ref_stats" / f"{key}.npz", resolution=64)
        # the validation images' statistics: training images 50000-, never the test split's
        val = load_ref_stats(key, out, split="val", extractor=det.name, resolution=32,
                             count=32, source="fashion-mnist/train[50000:60000]")
        vfeats = det(fashion_mnist_uint8("val", 32, limit=32)).double()
        torch.testing.assert_close(val.mean(), vfeats.mean(0), rtol=1e-6, atol=1e-8)
        assert not torch.allclose(val.mean(), stats.mean())


def test_rebuild_skips_done_stages_and_force_is_deterministic(world, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from diffdistill.app.world_build import STAGES, build_world

    # on a copy: the session's tiny world is read by other tests and must stay as built
    # (the copy's work folder keeps the same relative place to its assets)
    shared_out, shared_work, _ = world
    out, work = tmp_path / "assets", tmp_path / "work"
    shutil.copytree(shared_out, out)
    shutil.copytree(shared_work, work)
    before = json.loads((out / "world.json").read_text())
    old = load_file(str(out / "fmnist_net.safetensors"))
    logs: list[str] = []
    build_world(scale="tiny", out=out, work=work, log=logs.append)
    assert sum("outputs exist, skipped" in m for m in logs) == len(STAGES)  # report too
    build_world(scale="tiny", out=out, work=work, only=["classifier"], force=True,
                command="diffdistill world build --scale tiny --only classifier --force",
                log=logs.append)
    after = json.loads((out / "world.json").read_text())
    # "command" rebuilds everything; the partial run is recorded where it belongs
    assert after["command"] == "diffdistill world build --scale tiny"
    assert after["last_command"] == after["stages"]["classifier"]["command"] == (
        "diffdistill world build --scale tiny --only classifier --force")
    assert after["stages"]["vae"]["command"] == before["stages"]["vae"]["command"] == (
        "diffdistill world build --scale tiny")
    new = load_file(str(out / "fmnist_net.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert after["stages"]["clip"] == before["stages"]["clip"]
    assert after["accuracies"] == before["accuracies"]


def test_report_reruns_when_a_teachers_config_changes(world, tmp_path):
    import shutil
    from types import SimpleNamespace

    from diffdistill.app.world_build import _report_inputs

    out = tmp_path / "assets"
    shutil.copytree(world[0], out)
    ctx = SimpleNamespace(out=out)
    before = _report_inputs(ctx)
    cfg_file = out / "teacher_pixel" / "scheduler" / "scheduler_config.json"
    assert "teacher_pixel/scheduler/scheduler_config.json" in before
    assert "teacher_pixel/unet/diffusion_pytorch_model.safetensors" in before
    assert "world.json" not in before  # the report's own record
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "clip_sample": True}))  # same weights, new samples
    assert _report_inputs(ctx) != before


def test_cli_world_info(world, capsys):
    from diffdistill.cli import main

    out, _, _ = world
    assert main(["world", "info", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| teacher_latent |" in text and "fmnist_net_test_accuracy" in text


def test_build_refuses_unknown_stage(tmp_path):
    from diffdistill.app.world_build import build_world

    with pytest.raises(ValueError, match="unknown stage"):
        build_world(scale="tiny", out=tmp_path / "o", only=["teachers"])


# ----------------------------------------------------------------------------- shipped


def _require_shipped(*stages: str) -> dict:
    """world.json of the shipped world; fails (never skips) when it or a stage is missing."""
    from diffdistill.app.world_build import STAGES

    path = ASSETS_DIR / "world.json"
    hint = ("run `diffdistill world build` (about an hour on 2 idle CPU cores), or deselect "
            "with -m 'not world_assets'")
    if not path.is_file():
        pytest.fail(f"the embedded world is not built ({path} is missing): {hint}")
    info = json.loads(path.read_text())
    missing = [s for s in (stages or STAGES) if s not in info.get("stages", {})]
    if missing:
        pytest.fail(f"the shipped world lacks stage(s) {', '.join(missing)}: {hint}")
    return info


@pytest.mark.world_assets
def test_shipped_world_sizes_and_formats():
    from diffdistill.app.world_build import SIZE_BUDGET_BYTES, STAGES

    info = _require_shipped()
    assert info["scale"] == "full" and set(info["stages"]) == set(STAGES)
    files = [f for f in ASSETS_DIR.rglob("*") if f.is_file() and not f.name.startswith(".")]
    total = sum(f.stat().st_size for f in files)
    assert total <= SIZE_BUDGET_BYTES, f"{total / 1e6:.2f} MB shipped"
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    assert all(f.suffix == ".safetensors" for f in weights), weights
    assert _safetensors_dtypes(ASSETS_DIR) == {torch.float16}


@pytest.mark.world_assets
def test_shipped_world_accuracies_and_stats():
    from diffdistill.world import load_ref_stats

    info = _require_shipped("classifier", "clip", "ref_stats", "clip_judge")
    assert info["accuracies"]["fmnist_net_test_accuracy"] >= 0.90
    assert info["accuracies"]["clip_zero_shot_test_accuracy"] >= 0.5
    assert info["accuracies"]["clip_judge_zero_shot_train_accuracy"] >= 0.5
    for key in ("fmnist-net", "clip"):
        assert load_ref_stats(key, source="fashion-mnist/test", resolution=32).count == 10000
        assert load_ref_stats(key, split="val", source="fashion-mnist/train[50000:60000]",
                              resolution=32).count == 10000


@pytest.mark.world_assets
def test_shipped_teachers_load():
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from diffdistill.backbone import load_backbone

    _require_shipped("teacher_pixel", "teacher_latent", "teacher_flow")
    bb = load_backbone(ASSETS_DIR / "teacher_pixel")
    assert (bb.kind, bb.num_classes, bb.null_class, bb.resolution) == ("pixel", 10, 10, 32)
    assert bb.prediction_type == "v_prediction"
    assert bb.scheduler_config["clip_sample"] is False and bb.sampler_options("ddim") == {}
    pipe = StableDiffusionPipeline.from_pretrained(str(ASSETS_DIR / "teacher_latent"))
    img = pipe("a photo of a sneaker", height=32, width=32, num_inference_steps=2,
               output_type="np").images[0]
    assert img.shape == (32, 32, 3)
    flow = StableDiffusion3Pipeline.from_pretrained(str(ASSETS_DIR / "teacher_flow"),
                                                    text_encoder_3=None, tokenizer_3=None)
    assert flow.text_encoder_3 is None and flow.scheduler.config.shift == 1.0
    img = flow("a photo of a sneaker", height=32, width=32, num_inference_steps=2,
               max_sequence_length=0, output_type="np").images[0]
    assert img.shape == (32, 32, 3)


def test_fmnist_detector_metric_is_named_fid_fmnist():
    from diffdistill.eval.fid import metric_name

    from diffdistill.world.classifier import FMNISTDetector, FMNISTNet

    assert metric_name(FMNISTDetector(net=FMNISTNet())) == "FID-FMNIST"


def test_pyproject_lists_every_world_asset_folder():
    # setuptools installs (and stays quiet about) only the data folders `packages` names
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    assets = root / "diffdistill" / "world" / "assets"
    folders = {".".join(d.relative_to(root).parts) for d in [assets, *assets.rglob("*")]
               if d.is_dir() and not d.name.startswith((".", "__"))}
    assert folders and folders <= listed, sorted(folders - listed)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_shipped_json_holds_no_absolute_build_path():
    """Every JSON the package ships (world assets, configs) is free of the building
    machine's absolute paths (``_name_or_path`` and the like)."""
    import re

    from diffdistill.world import ASSETS_DIR

    roots = [Path(ASSETS_DIR), Path(__file__).resolve().parents[1] / "configs"]
    bad = []
    for root in roots:
        for f in root.rglob("*.json"):
            for s in _strings(json.loads(f.read_text())):
                if re.match(r"^(/|[A-Za-z]:\\)", s) or "/work/" in s or "/home/" in s:
                    bad.append(f"{f}: {s}")
    assert not bad, bad[:5]


def test_drop_build_paths(tmp_path):
    from diffdistill.export import drop_build_paths

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {"_name_or_path": "/home/me/run/unet", "in_channels": 4}))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_name_or_path": "x"}))
    assert drop_build_paths(tmp_path) == [tmp_path / "unet" / "config.json"]
    assert json.loads((tmp_path / "unet" / "config.json").read_text()) == {"in_channels": 4}
    assert drop_build_paths(tmp_path) == []


def test_the_flow_teacher_stage_builds_a_stock_sd3_folder_at_the_test_scale(world):
    """``teacher_flow`` at the tiny scale: an SD3 pipeline folder (MMDiT on the world VAE's
    latents, two CLIP encoders on the character-level tokenizer, no T5), pretrained by flow
    matching through the pretraining trainer, shipped in fp16 — and sampled by the stock
    ``StableDiffusion3Pipeline`` exactly as by the toolkit's flow Euler."""
    from diffusers import StableDiffusion3Pipeline

    from diffdistill.backbone import load_backbone
    from diffdistill.world.info import sample_teacher

    out, _, info = world
    metrics = info["stages"]["teacher_flow"]["metrics"]
    assert metrics["prediction_type"] == "flow" and metrics["latent_shape"] == [4, 8, 8]
    folder = out / "teacher_flow"
    assert _safetensors_dtypes(folder) == {torch.float16}
    assert not (folder / "text_encoder_3").exists()
    bb = load_backbone(folder)
    assert bb.kind == "sd3" and len(bb.tokenizer) == 514 and bb.ode_sampler == "flow_euler"
    # 40 CLIP tokens and no rows of T5 zeros (diffdistill.json): the text is 40 tokens
    assert bb.max_sequence_length == 0 and bb.tokenizer.model_max_length == 40
    assert bb.encode_prompts(["a photo of a coat"]).encoder_hidden_states.shape[1] == 40
    assert bb.text_encoder.config.vocab_size == 514 and bb.unet.config.sample_size == 8
    assert bb.tokenizer.convert_ids_to_tokens(bb.tokenizer("a coat").input_ids) == [
        "<|startoftext|>", "a</w>", "c", "o", "a", "t</w>", "<|endoftext|>"]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None,
                                                    tokenizer_3=None)
    ours = sample_teacher(None, 2, steps=2, guidance_scale=2.0, seed=5, backbone=bb)
    from diffdistill.world.info import teacher_prompts

    _, prompts = teacher_prompts(2)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=2, guidance_scale=2.0, generator=gens,
                   output_type="np", height=32, width=32, max_sequence_length=0).images
    ref = torch.from_numpy((ref * 255).round()).permute(0, 3, 1, 2)
    assert (ref - ours.float()).abs().max() <= 1
