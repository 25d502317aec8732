"""``diffdistill world build``: the recipe that makes the embedded tiny world from scratch.

Stages (each writes its outputs atomically, records wall/CPU seconds and metrics in
``world.json``, and is skipped when its outputs exist unless ``--force``):

=================  ==========================================================================
``classifier``     Fashion-MNIST feature network (:mod:`.classifier`) → ``fmnist_net.safetensors``
``clip``           tiny open_clip model trained contrastively (:mod:`.clip`) → ``clip/``
``ref_stats``      test-split feature statistics per extractor → ``ref_stats/*.npz``; also the
                   train-vs-test Fréchet distance (the floor any generator is measured against)
``vae``            tiny AutoencoderKL (:mod:`.vae`) → ``WORK/vae`` (ships inside the latent teacher)
``teacher_pixel``  class-conditional UNet2DModel at 32×32 px, trained by the project's
                   ``PretrainTrainer`` with ``configs/pretrain/toy_pixel.yaml`` → ``teacher_pixel/``
``teacher_latent`` StableDiffusionPipeline on 8×8×4 latents, ``PretrainTrainer`` with
                   ``configs/pretrain/toy_latent.yaml`` → ``teacher_latent/``
``clip_judge``     the independent CLIP judge: another architecture (ViT image tower), another
                   seed, trained on the *test* split the reward CLIP never saw → ``clip_judge/``
                   (``diffdistill bench`` scores CLIP with it; :mod:`.clip`)
``teacher_flow``   StableDiffusion3Pipeline (rectified flow, tiny MMDiT) on the same latents,
                   ``PretrainTrainer``'s flow-matching loss with ``configs/pretrain/toy_flow.yaml``
                   → ``teacher_flow/``
``report``         quick FID-FMNIST / CLIP score per teacher and guidance scale, sample grids,
                   file sizes (checked against the 25 MB budget)
=================  ==========================================================================

Architectures and step counts (``RECIPES["full"]``) are sized for about an hour on an idle
2-core CPU. The yardstick is the measured ~0.55 s for fwd+bwd+Adam of a batch of 64 through
a 0.13 GFLOP/sample diffusers UNet (≈ 45 GFLOP/s on two cores); a 32×32 UNet with 32
channels at full resolution, e.g. (32, 64, 64), costs 0.50 GFLOP/sample (≈ 2.1 s per step),
too much for enough steps. So the pixel teacher is (16, 32, 64, 64) with 16-group norms and
attention only at 4×4 (0.19 GFLOP/sample, ≈ 0.8 s/step, 1.1 M params) and the latent
teacher's UNet is (32, 64) at 8×8 with cross-attention at both levels (0.05 GFLOP/sample,
1.1 M params). Cheap teachers also make every distillation demo on them cheap. Each
teacher's GFLOPs per call are recorded in ``world.json``; so are the measured wall and CPU
seconds of every stage. ``RECIPES["tiny"]`` runs every stage with the same structures at the
narrowest widths for a couple of steps on a few hundred images (the test; seconds per stage).

Teacher weights go through ``PretrainTrainer`` exactly as a user's run would: the build
writes a freshly initialised pipeline folder (``WORK/init/<teacher>``), points the YAML's
``model.path`` at it, trains, and ships the EMA export with every floating tensor cast to
fp16 (loaders read them back in fp32). The text encoder of the latent teacher stays at its
seeded random initialisation and frozen, as in the pretraining trainer: prompts map to
distinct embeddings and the UNet learns to read them (with 10 % empty prompts for CFG).

Determinism: every stage seeds torch and its own generators from ``seed + stage offset``,
the trainers draw all randomness from their seeded generator, and data order is a function
of the seed; a rebuild on the same machine, library versions and number of torch threads
gives the same weights (CPU kernels split work by thread, so the thread count changes the
last bits). ``world.json`` records the thread count. On a machine shared with other jobs,
``OMP_NUM_THREADS=1`` is faster than two threads (measured 2× on the 2-core development
machine under load: OpenMP threads wait at barriers for descheduled peers).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from diffdistill.export import drop_build_paths
from diffdistill.world import (
    ASSETS_DIR,
    REF_STATS,
    SIZE_BUDGET_BYTES,
    STAGES,
    TEACHERS,
    fresh_tmp,
    replace_dir,
)
from diffdistill.world.info import asset_sizes, format_info, sample_teacher, teacher_prompts
from diffdistill.world.teachers import (
    finalize_teacher,
    init_teacher_flow,
    init_teacher_latent,
    init_teacher_pixel,
    unet_gflops,
)

FORMAT_VERSION = 1

# fixed per stage (not the position in STAGES), so adding a stage changes no other's seed
STAGE_SEED_OFFSET = {"classifier": 1, "clip": 2, "ref_stats": 3, "vae": 4, "teacher_pixel": 5,
                     "teacher_latent": 6, "report": 7, "clip_judge": 8, "teacher_flow": 9}

PIXEL_UNET = dict(channels=(16, 32, 64, 64), layers_per_block=1, norm_groups=16,
                  down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D",
                                    "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"))
LATENT_UNET = dict(channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TEXT_ENCODER = dict(hidden=32, layers=2)
# the flow teacher's MMDiT on the VAE's 8x8x4 latents: patch 2 -> 16 image tokens beside 77
# character tokens and SD3's 256 rows of T5 zeros; width 64 = 4 heads x 16
FLOW_TRANSFORMER = dict(layers=4, heads=4, head_dim=16)
VAE = dict(channels=(16, 32, 64), norm_groups=16, latent_channels=4)

# The test scale keeps every structure (block types, factor-4 VAE, both towers of CLIP) with
# the narrowest widths the group norms allow, so each stage takes seconds.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                            "patch_size": None},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2,
                          "layers": 1}}
TINY_JUDGE = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8,
                             "patch_size": 8, "mlp_ratio": 2.0},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2,
                           "layers": 1}}
TINY_TRAIN = {"train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0,
                        "lr_warmup_steps": 0},
              "data": {"limit": 64}, "log": {"every": 1}}

RECIPES: dict[str, dict] = {
    "full": {
        "seed": 0,
        "classifier": dict(steps=1410, batch_size=128, lr=3e-3, widths=(32, 64, 128)),  # 3 ep.
        "clip": dict(steps=700, batch_size=256, lr=2e-3, config=None),  # 3 epochs
        # the judge: 18 epochs of the 10k test images; accuracy on 10k training images
        "clip_judge": dict(steps=700, batch_size=256, lr=2e-3, config="judge",
                           test_limit=10000),
        "ref_stats": dict(extractors=("fmnist-net", "clip"), test_limit=None, floor_train=10000,
                          val_limit=None),
        "vae": dict(**VAE, steps=1200, batch_size=32, lr=1e-3, kl_weight=1e-5,
                    test_limit=2000),
        "teacher_pixel": dict(config="toy_pixel.yaml", unet=PIXEL_UNET, overrides={}),
        "teacher_latent": dict(config="toy_latent.yaml", unet=LATENT_UNET,
                               text_encoder=TEXT_ENCODER, overrides={}),
        "teacher_flow": dict(config="toy_flow.yaml", transformer=FLOW_TRANSFORMER,
                             text_encoder=TEXT_ENCODER, overrides={}),
        "report": dict(num_samples=500, steps=25, guidance_scales=(1.0, 2.0, 3.0), grid=40,
                       batch_size=250),
    },
    "tiny": {
        "seed": 0,
        "classifier": dict(steps=2, batch_size=16, lr=3e-3, widths=(8, 8, 16), limit=256,
                           test_limit=32),
        "clip": dict(steps=2, batch_size=8, lr=2e-3, config=TINY_CLIP, limit=256,
                     test_limit=32),
        "clip_judge": dict(steps=2, batch_size=8, lr=2e-3, config="judge-tiny", limit=64,
                           test_limit=32),
        "ref_stats": dict(extractors=("fmnist-net", "clip"), test_limit=32, floor_train=32,
                          val_limit=32),
        "vae": dict(VAE, channels=(16, 16, 16), steps=2, batch_size=4, lr=1e-3,
                    kl_weight=1e-5, limit=256, test_limit=8, scale_images=16),
        "teacher_pixel": dict(config="toy_pixel.yaml", overrides=TINY_TRAIN,
                              unet=dict(PIXEL_UNET, channels=(16, 16, 16, 16))),
        "teacher_latent": dict(config="toy_latent.yaml", text_encoder=TEXT_ENCODER,
                               unet=dict(LATENT_UNET, channels=(32, 32)), overrides=TINY_TRAIN),
        "teacher_flow": dict(config="toy_flow.yaml", text_encoder=TEXT_ENCODER,
                             transformer=dict(layers=1, heads=2, head_dim=8),
                             overrides=TINY_TRAIN),
        "report": dict(num_samples=4, steps=2, guidance_scales=(2.0,), grid=4, batch_size=4),
    },
}


# ----------------------------------------------------------------------------- plumbing


@dataclass
class BuildContext:
    scale: str
    recipe: dict
    out: Path  # shipped assets
    work: Path  # init folders, training runs, VAE, grids (not shipped)
    seed: int
    root: Optional[str] = None  # Fashion-MNIST folder (None: the usual lookup)
    command: str = ""
    log: Callable[[str], None] = print
    world: dict = field(default_factory=dict)

    def stage_seed(self, stage: str) -> int:
        return self.seed * 1000 + STAGE_SEED_OFFSET[stage]


def _default_log(msg: str) -> None:
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _machine() -> dict:
    import diffusers

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.cuda.is_available()}


# ----------------------------------------------------------------------------- outputs


def stage_outputs(stage: str, ctx: BuildContext) -> list[Path]:
    """Files whose existence means ``stage`` is done."""
    out = ctx.out
    if stage == "classifier":
        return [out / "fmnist_net.safetensors"]
    if stage == "clip":
        from diffdistill.world.clip import MODEL_NAME, WEIGHTS_FILE

        return [out / "clip" / WEIGHTS_FILE, out / "clip" / f"{MODEL_NAME}.json"]
    if stage == "clip_judge":
        from diffdistill.world.clip import JUDGE_MODEL_NAME, WEIGHTS_FILE

        return [out / "clip_judge" / WEIGHTS_FILE, out / "clip_judge" / f"{JUDGE_MODEL_NAME}.json"]
    if stage == "ref_stats":
        return [out / "ref_stats" / f"{k}{suffix}.npz" for k in ctx.recipe["ref_stats"]["extractors"]
                for suffix in ("", "_val")]
    if stage == "vae":
        return [ctx.work / "vae" / "diffusion_pytorch_model.safetensors"]
    if stage in ("teacher_pixel", "teacher_latent", "teacher_flow"):
        net = "transformer" if stage == "teacher_flow" else "unet"
        return [out / stage / "model_index.json",
                out / stage / net / "diffusion_pytorch_model.safetensors"]
    if stage == "report":
        return []
    raise KeyError(stage)


def stage_done(stage: str, ctx: BuildContext) -> bool:
    if stage == "vae":
        # the shipped latent teacher carries the VAE: no need to retrain it
        shipped = ctx.out / "teacher_latent" / "vae" / "diffusion_pytorch_model.safetensors"
        return all(p.exists() for p in stage_outputs("vae", ctx)) or shipped.exists()
    if stage == "report":
        rep = ctx.world.get("report")
        return bool(rep) and rep.get("inputs") == _report_inputs(ctx)
    return all(p.exists() for p in stage_outputs(stage, ctx))


def _report_inputs(ctx: BuildContext) -> dict:
    """Fingerprint of what the report measured: sizes + mtimes of the weight files and of
    the teachers' configs (a scheduler setting such as ``clip_sample`` changes the samples)."""
    files = {}
    for f in sorted(ctx.out.rglob("*")):
        config = f.suffix == ".json" and f.parent != ctx.out  # not world.json
        if f.is_file() and (f.suffix in (".safetensors", ".npz") or config):
            st = f.stat()
            files[str(f.relative_to(ctx.out))] = [st.st_size, int(st.st_mtime)]
    return files


def _require(ctx: BuildContext, stage: str, needed_by: str) -> None:
    if not stage_done(stage, ctx):
        raise FileNotFoundError(
            f"stage {needed_by!r} needs the outputs of stage {stage!r} "
            f"({', '.join(str(p) for p in stage_outputs(stage, ctx)) or 'world.json'}); "
            f"run `diffdistill world build --only {stage}` first")


# ----------------------------------------------------------------------------- stages


def run_classifier(ctx: BuildContext) -> dict:
    from diffdistill.world.classifier import train_fmnist_net

    r = dict(ctx.recipe["classifier"])
    return train_fmnist_net(ctx.out / "fmnist_net.safetensors", seed=ctx.stage_seed("classifier"),
                            root=ctx.root, log=ctx.log, **r)


def run_clip(ctx: BuildContext) -> dict:
    from diffdistill.world.clip import train_clip

    final = ctx.out / "clip"
    tmp = fresh_tmp(final)
    metrics = train_clip(tmp, seed=ctx.stage_seed("clip"), root=ctx.root, log=ctx.log,
                         **ctx.recipe["clip"])
    replace_dir(tmp, final)
    return metrics


def run_clip_judge(ctx: BuildContext) -> dict:
    """The independent CLIP judge (:data:`~diffdistill.world.clip.JUDGE_CONFIG`): trained on
    the test split, its zero-shot accuracy measured on training images."""
    from diffdistill.world.clip import JUDGE_CONFIG, JUDGE_MODEL_NAME, train_clip

    r = dict(ctx.recipe["clip_judge"])
    config = {"judge": JUDGE_CONFIG, "judge-tiny": TINY_JUDGE}[r.pop("config")]
    final = ctx.out / "clip_judge"
    tmp = fresh_tmp(final)
    metrics = train_clip(tmp, seed=ctx.stage_seed("clip_judge"), root=ctx.root, log=ctx.log,
                         config=config, name=JUDGE_MODEL_NAME, split="test",
                         eval_split="train", **r)
    replace_dir(tmp, final)
    return metrics


def _detector(key: str, ctx: BuildContext):
    if key == "fmnist-net":
        from diffdistill.world.classifier import FMNISTDetector

        return FMNISTDetector(weights_path=ctx.out / "fmnist_net.safetensors")
    if key in ("clip", "clip_judge"):
        from diffdistill.world.clip import clip_detector

        return clip_detector(ctx.out / key)
    raise KeyError(f"unknown world extractor {key!r}; choose from {sorted(REF_STATS)}")


def _stats(detector, images: torch.Tensor, source: str, batch_size: int = 250):
    from diffdistill.eval.features import iter_feature_batches
    from diffdistill.eval.fid import FeatureStats

    stats = FeatureStats.for_detector(detector, resolution=32, source=source)
    for feats in iter_feature_batches(detector, images, batch_size=batch_size):
        stats.update(feats)
    return stats


def run_ref_stats(ctx: BuildContext) -> dict:
    from diffdistill.eval.fid import fid_from_stats
    from diffdistill.fmnist import fashion_mnist_uint8

    _require(ctx, "classifier", "ref_stats")
    _require(ctx, "clip", "ref_stats")
    r = ctx.recipe["ref_stats"]
    from diffdistill.eval.reference import FMNIST_SOURCE, FMNIST_VAL_SOURCE

    test = fashion_mnist_uint8("test", 32, root=ctx.root, limit=r["test_limit"])
    train = fashion_mnist_uint8("train", 32, root=ctx.root, limit=r["floor_train"])
    val = fashion_mnist_uint8("val", 32, root=ctx.root, limit=r.get("val_limit"))
    metrics: dict = {"test_images": len(test), "floor_train_images": len(train),
                     "val_images": len(val)}
    for key in r["extractors"]:
        det = _detector(key, ctx)
        ref = _stats(det, test, FMNIST_SOURCE)
        path = ref.save(ctx.out / "ref_stats" / f"{key}.npz")
        floor = fid_from_stats(_stats(det, train, "fashion-mnist/train"), ref, check_meta=True)
        # the validation images' statistics, for choosing knobs (never the test split)
        val_ref = _stats(det, val, FMNIST_VAL_SOURCE)
        val_path = val_ref.save(ctx.out / "ref_stats" / f"{key}_val.npz")
        metrics[key] = {"file": str(path.relative_to(ctx.out)), "extractor": det.name,
                        "feature_dim": det.feature_dim, "count": ref.count,
                        "train_vs_test_fd": floor,
                        "val_file": str(val_path.relative_to(ctx.out)), "val_count": val_ref.count,
                        "val_vs_test_fd": fid_from_stats(val_ref, ref)}
        ctx.log(f"  ref stats {key}: {ref.count} test images, {det.feature_dim}-d; "
                f"train({len(train)}) vs test Fréchet distance {floor:.3f}; "
                f"validation ({val_ref.count}) vs test {metrics[key]['val_vs_test_fd']:.3f}")
    return metrics


def run_vae(ctx: BuildContext) -> dict:
    from diffdistill.world.vae import train_vae

    final = ctx.work / "vae"
    tmp = fresh_tmp(final)
    metrics = train_vae(tmp, seed=ctx.stage_seed("vae"), root=ctx.root, log=ctx.log,
                        **ctx.recipe["vae"])
    replace_dir(tmp, final)
    # The floor under the latent teacher: FID-FMNIST of the test split's reconstructions.
    if stage_done("classifier", ctx) and (ctx.out / "ref_stats" / "fmnist-net.npz").exists():
        from diffusers import AutoencoderKL

        from diffdistill.eval.fid import fid_from_stats
        from diffdistill.fmnist import fashion_mnist_uint8
        from diffdistill.world import load_ref_stats
        from diffdistill.world.vae import reconstruct

        vae = AutoencoderKL.from_pretrained(str(final)).eval()
        limit = ctx.recipe["ref_stats"]["test_limit"]
        recon = reconstruct(vae, fashion_mnist_uint8("test", 32, root=ctx.root, limit=limit))
        ref = load_ref_stats("fmnist-net", ctx.out)
        fid = fid_from_stats(_stats(_detector("fmnist-net", ctx), recon, "vae-recon"), ref)
        metrics["test_recon_fid_fmnist"] = fid
        ctx.log(f"  vae: FID-FMNIST of test reconstructions {fid:.3f}")
    return metrics


def _latent_vae_dir(ctx: BuildContext) -> Path:
    for cand in (ctx.work / "vae", ctx.out / "teacher_latent" / "vae"):
        if (cand / "diffusion_pytorch_model.safetensors").exists():
            return cand
    raise FileNotFoundError("the latent teacher needs the VAE: run `diffdistill world build "
                            "--only vae` first")


def _pretrain_config(ctx: BuildContext, stage: str, init_dir: Path):
    from diffdistill.config import build_config, deep_merge, load_yaml, packaged_config_dir
    from diffdistill.trainers.pretrain import PretrainConfig

    r = ctx.recipe[stage]
    path = packaged_config_dir() / "pretrain" / r["config"]
    if not path.is_file():
        raise FileNotFoundError(f"teacher config {path} is missing (the build reads the "
                                "packaged configs/pretrain/*.yaml)")
    data = load_yaml(path)
    over: dict = {"model": {"path": str(init_dir)}, "output_dir": str(ctx.work / "train" / stage),
                  "seed": ctx.stage_seed(stage)}
    if ctx.root:
        over["data"] = {"path": str(ctx.root)}
    if stage in ("teacher_latent", "teacher_flow"):  # the same VAE: one posterior cache
        over.setdefault("data", {})["cache_dir"] = str(ctx.work / "cache")
    data = deep_merge(deep_merge(data, over), copy.deepcopy(r.get("overrides", {})))
    return path, build_config(PretrainConfig, data)


def _run_teacher(ctx: BuildContext, stage: str) -> dict:
    from diffdistill.trainers.pretrain import PretrainTrainer

    seed = ctx.stage_seed(stage)
    init_dir = ctx.work / "init" / stage
    r = ctx.recipe[stage]
    if not (init_dir / "model_index.json").exists():
        if stage == "teacher_pixel":
            init_teacher_pixel(init_dir, seed, r["unet"])
        elif stage == "teacher_flow":
            init_teacher_flow(init_dir, seed, _latent_vae_dir(ctx), r["transformer"],
                              r["text_encoder"])
        else:
            init_teacher_latent(init_dir, seed, _latent_vae_dir(ctx), r["unet"],
                                r["text_encoder"])
    cfg_path, cfg = _pretrain_config(ctx, stage, init_dir)
    ctx.log(f"  {stage}: PretrainTrainer with {cfg_path.name} (max_steps "
            f"{cfg.train.max_steps}, batch {cfg.train.batch_size}, lr {cfg.train.lr}) -> "
            f"{cfg.output_dir}")
    trainer = PretrainTrainer(cfg)
    last = trainer.fit(resume="latest")
    unet = trainer.generator_unet()
    params = sum(p.numel() for p in unet.parameters())
    gflops = unet_gflops(trainer.backbone, unet)
    export = Path(cfg.output_dir) / "export"
    finalize_teacher(export, ctx.out / stage, stage, last)
    metrics = {"config": f"configs/pretrain/{cfg_path.name}",
               "max_steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
               "lr": cfg.train.lr, "ema_decay": cfg.train.ema_decay,
               "cond_dropout": cfg.pretrain.cond_dropout,
               "min_snr_gamma": cfg.pretrain.min_snr_gamma,
               "final_loss": float(last.get("loss", float("nan"))), "unet_params": params,
               "unet_gflops_per_sample": gflops,
               "prediction_type": trainer.backbone.prediction_type}
    if stage in ("teacher_latent", "teacher_flow"):
        metrics["latent_shape"] = [trainer.backbone.latent_channels,
                                   32 // trainer.backbone.vae_scale_factor,
                                   32 // trainer.backbone.vae_scale_factor]
        metrics["text_encoder"] = ("CLIPTextModel, random init (seeded), frozen"
                                   if stage == "teacher_latent" else
                                   "two CLIPTextModelWithProjection on a character-level CLIP "
                                   "tokenizer, random init (seeded), frozen; no T5")
    ctx.log(f"  {stage}: final loss {metrics['final_loss']:.4f}, UNet {params / 1e6:.2f} M "
            f"params -> {ctx.out / stage}")
    return metrics


def run_teacher_pixel(ctx: BuildContext) -> dict:
    return _run_teacher(ctx, "teacher_pixel")


def run_teacher_latent(ctx: BuildContext) -> dict:
    return _run_teacher(ctx, "teacher_latent")


def run_teacher_flow(ctx: BuildContext) -> dict:
    return _run_teacher(ctx, "teacher_flow")


def run_report(ctx: BuildContext) -> dict:
    from diffdistill.backbone import load_backbone
    from diffdistill.eval.clip_score import clip_score
    from diffdistill.eval.fid import fid_from_stats
    from diffdistill.images import save_grid
    from diffdistill.world import load_ref_stats

    for s in ("classifier", "clip", "ref_stats", *TEACHERS, "clip_judge"):
        _require(ctx, s, "report")
    r = ctx.recipe["report"]
    fm = _detector("fmnist-net", ctx)
    cd = _detector("clip", ctx)
    judge = _detector("clip_judge", ctx)
    ref = load_ref_stats("fmnist-net", ctx.out)
    seed = ctx.stage_seed("report")
    teachers: dict = {}
    for name in ("teacher_pixel", "teacher_latent", "teacher_flow"):
        bb = load_backbone(ctx.out / name)
        sampler = bb.ode_sampler
        rows, samples = [], {}
        for gs in r["guidance_scales"]:
            t0 = time.perf_counter()
            imgs = sample_teacher(None, r["num_samples"], steps=r["steps"], guidance_scale=gs,
                                  seed=seed, batch_size=r["batch_size"], backbone=bb,
                                  sampler=sampler)
            fid = fid_from_stats(_stats(fm, imgs, f"{name}-samples"), ref)
            labels, prompts = teacher_prompts(len(imgs))
            cs = clip_score(cd, imgs, prompts).mean
            cs_judge = clip_score(judge, imgs, prompts).mean
            acc = float((fm.predict(imgs) == torch.tensor(labels)).float().mean())
            rows.append({"guidance_scale": gs, "fid_fmnist": fid, "clip_score": cs,
                         "clip_score_judge": cs_judge,
                         "class_accuracy": acc, "sample_s": time.perf_counter() - t0})
            samples[gs] = imgs[:r["grid"]]
            ctx.log(f"  {name}: cfg {gs:g}, {sampler} {r['steps']} steps, {len(imgs)} samples: "
                    f"FID-FMNIST {fid:.2f}, CLIP score {cs:.4f}, classifier agrees {acc:.3f}")
        best = min(rows, key=lambda row: row["fid_fmnist"])
        grid_path = save_grid(samples[best["guidance_scale"]], ctx.work / "grids" / f"{name}.png",
                              nrow=10, scale=3)
        teachers[name] = {"sampler": sampler, "steps": r["steps"],
                          "num_samples": r["num_samples"], "rows": rows,
                          "best_guidance_scale": best["guidance_scale"],
                          "grid": str(grid_path.relative_to(ctx.work))}  # in the work dir
    sizes = {k: v for k, v in asset_sizes(ctx.out).items() if k != "world.json"}
    total = sum(sizes.values())  # + world.json itself (a few kB) once written
    forbidden = [f for f in sizes if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    ctx.log(f"  shipped files: {len(sizes)}, {total / 1e6:.2f} MB (budget "
            f"{SIZE_BUDGET_BYTES / 1e6:.0f} MB)")
    if forbidden:
        raise RuntimeError(f"non-safetensors weight files in the assets: {forbidden}")
    return {"teachers": teachers, "total_bytes": total, "files": len(sizes),
            "within_budget": total <= SIZE_BUDGET_BYTES, "inputs": _report_inputs(ctx)}


RUNNERS = {
    "classifier": run_classifier,
    "clip": run_clip,
    "ref_stats": run_ref_stats,
    "vae": run_vae,
    "teacher_pixel": run_teacher_pixel,
    "teacher_latent": run_teacher_latent,
    "teacher_flow": run_teacher_flow,
    "clip_judge": run_clip_judge,
    "report": run_report,
}


# ----------------------------------------------------------------------------- driver


def _summaries(world: dict) -> None:
    """Top-level fields a reader wants first (accuracies, sizes), refreshed after each stage."""
    st = world.get("stages", {})
    acc = {}
    if "classifier" in st:
        acc["fmnist_net_test_accuracy"] = st["classifier"]["metrics"]["test_accuracy"]
    if "clip" in st:
        acc["clip_zero_shot_test_accuracy"] = st["clip"]["metrics"]["zero_shot_accuracy"]
    if "clip_judge" in st:  # trained on the test split: measured on training images
        acc["clip_judge_zero_shot_train_accuracy"] = \
            st["clip_judge"]["metrics"]["zero_shot_accuracy"]
    world["accuracies"] = acc
    world["cpu_seconds_total"] = sum(s.get("cpu_s", 0.0) for s in st.values())
    world["wall_seconds_total"] = sum(s.get("wall_s", 0.0) for s in st.values())


def resolve_dirs(scale: str, out=None, work=None) -> tuple[Path, Path]:
    """(assets dir, work dir): defaults are the package assets + ``runs/world_build`` for
    ``full``, a new temporary folder + its sibling ``OUT-work`` for ``tiny``."""
    if out is None:
        out = ASSETS_DIR if scale == "full" else Path(tempfile.mkdtemp(prefix="diffdistill-world-"))
    out = Path(out).resolve()
    if work is None:
        work = "runs/world_build" if scale == "full" else out.with_name(out.name + "-work")
    work = Path(work).resolve()
    return out, work


def build_world(scale: str = "full", out=None, work=None, only=None, force: bool = False,
                root=None, command: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the recipe (see the module docstring); returns the ``world.json`` content.

    ``out``: where the shipped assets go (default: the package's assets for ``full``, a new
    temporary folder for ``tiny``); ``work``: intermediate files (default
    ``runs/world_build`` for ``full``, ``OUT-work`` beside ``OUT`` for ``tiny``); ``only``:
    stage names to run; ``force``: rerun stages whose outputs exist.
    """
    if scale not in RECIPES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(RECIPES)}")
    only = list(only or STAGES)
    unknown = [s for s in only if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    out, work = resolve_dirs(scale, out, work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = log or _default_log
    recipe = RECIPES[scale]
    world_path = out / "world.json"
    world = json.loads(world_path.read_text()) if world_path.exists() else {}
    if world.get("scale") not in (None, scale):
        raise ValueError(f"{world_path} was built at scale {world['scale']!r}, not {scale!r}: "
                         "use another --out")
    # "command" rebuilds everything; "last_command" is this invocation (maybe --only one
    # stage); each stage entry records the invocation that built it.
    invocation = command or f"diffdistill world build --scale {scale}"
    world.update({"format_version": FORMAT_VERSION, "scale": scale, "seed": recipe["seed"],
                  "command": f"diffdistill world build --scale {scale}",
                  "last_command": invocation, "machine": _machine()})
    world.setdefault("stages", {})
    ctx = BuildContext(scale=scale, recipe=recipe, out=out, work=work, seed=recipe["seed"],
                       root=str(root) if root else None, command=invocation, log=log,
                       world=world)
    log(f"building the embedded world ({scale}) into {out} (work: {work}); stages: "
        f"{', '.join(s for s in STAGES if s in only)}")
    for stage in STAGES:
        if stage not in only:
            continue
        if not force and stage_done(stage, ctx):
            log(f"stage {stage}: outputs exist, skipped")
            continue
        log(f"stage {stage}: start (seed {ctx.stage_seed(stage)})")
        torch.manual_seed(ctx.stage_seed(stage))
        w0, c0 = time.perf_counter(), time.process_time()
        metrics = RUNNERS[stage](ctx)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        entry = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                 "seed": ctx.stage_seed(stage), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": invocation,
                 "settings": _settings(recipe, stage), "metrics": metrics}
        if stage == "report":
            world["report"] = {"inputs": metrics.pop("inputs")}
            world["teachers"] = metrics["teachers"]
            world["total_bytes"] = metrics["total_bytes"]
        world["stages"][stage] = entry
        drop_build_paths(out)  # no path of the building machine in the shipped configs
        _merge_stages_from_disk(world_path, world)
        _summaries(world)
        _atomic_write_json(world_path, world)
        log(f"stage {stage}: done in {wall:.0f} s wall, {cpu:.0f} s CPU")
    _merge_stages_from_disk(world_path, world)
    _summaries(world)
    _atomic_write_json(world_path, world)
    return world


def _merge_stages_from_disk(world_path: Path, world: dict) -> None:
    """Keep stage entries another build process (``--only`` of another stage) wrote since
    this one started: two teachers can train side by side on two cores."""
    if not world_path.exists():
        return
    on_disk = json.loads(world_path.read_text()).get("stages", {})
    mine = world["stages"]
    for name, entry in on_disk.items():
        if name not in mine or entry.get("finished", "") > mine[name].get("finished", ""):
            mine[name] = entry


def _settings(recipe: dict, stage: str) -> dict:
    return json.loads(json.dumps(recipe.get(stage, {}), default=_json_default))


def main_build(args) -> int:
    """CLI handler of ``diffdistill world build`` / ``diffdistill world info``."""
    if args.action == "info":
        print(format_info(args.out))
        return 0
    out, work = resolve_dirs(args.scale, args.out, args.work)
    command = f"diffdistill world build --scale {args.scale}"
    if args.only:
        command += " --only " + " ".join(args.only)
    if args.force:
        command += " --force"
    build_world(scale=args.scale, out=out, work=work, only=args.only, force=args.force,
                root=args.data, command=command)
    print(format_info(out))
    return 0
