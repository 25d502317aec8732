"""The ``diffdistill`` command: train, sample, export, bench, convergence, world, demo.

``diffdistill train CONFIG [key=value ...]`` runs one process; for several, use
``accelerate launch -m diffdistill.train CONFIG [key=value ...]`` (same arguments).

Failures a user can act on (a bad key, a folder in use, a damaged checkpoint, a full disk)
print one line and no traceback (``-v`` adds it); the exit status tells them apart (0
finished, 1 run failed, 2 bad input, 75 stopped by SIGTERM / SIGINT with a checkpoint — see
:mod:`diffdistill.errors` and ``docs/reliability.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

EPILOG_TRAIN = """\
Overrides use dotted keys, e.g.  train.lr=1e-5  adapter.type=lora  adapter.rank=16
Public keys: model.path output_dir seed train.max_steps train.batch_size train.lr
train.grad_accum train.mixed_precision(no|fp16|bf16) train.checkpoint_every
adapter.type(lora|full) adapter.rank adapter.alpha.  Multi-GPU:
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m diffdistill.train CONFIG
SIGTERM / Ctrl-C: the step finishes, a checkpoint is written, exit status 75 (a second
signal aborts at once); continue with --resume latest.  Exit status: 0 finished, 1 the run
failed, 2 bad input (nothing trained), 75 stopped.  One run per output_dir (a lock file).
"""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 steps or images is a mistake, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (its 'method' key picks the trainer)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint in output_dir, or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 even if output_dir holds another run: its files "
                   "are moved into output_dir/previous-<time>/ (nothing is deleted)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="diffdistill",
        description="Distil diffusion models into fast 1-8 step generators.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a YAML config", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(p)

    p = sub.add_parser("sample", help="generate images from an export or base + LoRA")
    p.add_argument("model", help="a full pipeline folder (an export), or the base model "
                   "folder when --lora is given")
    p.add_argument("--lora", default=None, help="folder with pytorch_lora_weights.safetensors")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt (repeatable); text-to-image models")
    p.add_argument("--class-label", type=int, action="append", default=None,
                   help="class index (repeatable); class-conditional pixel models")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="number of sampling steps (default: the export's recorded steps, or 4)")
    p.add_argument("--sampler", default="auto",
                   help="auto (from the folder's scheduler), onestep, lcm, tcd, ddim, euler, heun")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale (1 = off; a full LCM embeds it instead); default: the "
                   "export's recorded value, or 1")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network first (pays off for many images)")
    p.add_argument("--num", type=_positive_int, default=4, help="images per prompt")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="image size in px (default: the model's own; a multiple of the VAE "
                        "factor, twice it for Flux)")
    p.add_argument("--out", default="samples.png", help="output PNG (a grid)")

    p = sub.add_parser("export", help="(re-)export a run's newest checkpoint")
    p.add_argument("run_dir", help="a training output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint folder")
    p.add_argument("--out", default=None, help="export folder (default RUN_DIR/export)")

    p = sub.add_parser("world", help="build or describe the embedded tiny world",
                       description="build: train the embedded world (Fashion-MNIST feature net, "
                       "CLIP, reference statistics, VAE, both teachers) with fixed seeds; "
                       "stages whose outputs exist are skipped. info: what is built.")
    p.add_argument("action", choices=["build", "info"])
    p.add_argument("--scale", choices=["full", "tiny"], default="full",
                   help="full: the shipped world (~1 h on 2 CPU cores); tiny: every stage for "
                   "a few steps (the test), into a temporary folder unless --out is given")
    p.add_argument("--out", default=None, help="assets folder (default: the package's "
                   "diffdistill/world/assets for full)")
    p.add_argument("--work", default=None, help="intermediate files (default runs/world_build)")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE",
                   help="run only these stages: classifier clip ref_stats vae teacher_pixel "
                   "teacher_latent report")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files "
                   "(default: $DIFFDISTILL_FMNIST or /usr/share/datasets/fashion-mnist)")

    p = sub.add_parser(
        "bench", help="evaluate a teacher and students: FID/FDs, CLIP score, s/img, memory",
        description="Sample every model of BENCH.yaml at its step counts through the shared "
        "sampler and write results.json, results.md, grid.png and fid_vs_steps.png into its "
        "'out' folder. Several processes: accelerate launch -m diffdistill.cli bench ...",
        epilog="Overrides use dotted keys, e.g.  num_samples=1000  out=runs/bench2  "
        "reference.resolution=256  batch_size=32")
    p.add_argument("config", help="bench YAML (see configs/bench/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_samples=1000")

    p = sub.add_parser(
        "convergence", help="plot training runs' periodic evals against step and wall time",
        description="Read each run's metrics.jsonl (its eval.every evaluations) and write "
        "convergence.json and convergence.png (metric vs training step and vs training wall "
        "time, one line per run) into --out.")
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                   help="training output_dir(s); LABEL defaults to the folder name")
    p.add_argument("--out", default=".", help="folder for convergence.json / .png")

    p = sub.add_parser("demo", help="distill the embedded world's teacher and compare",
                       description="Distill the embedded world's teacher with the toolkit's "
                       "methods, bench teacher and students, write the grid and the plot.")
    p.add_argument("--out", default="runs/demo", help="where the demo writes everything")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--methods", default=None,
                   help="comma-separated: lcd, lcd-lora, rglcd, dmd2, fdistill, hypersd, ict, "
                   "dmd2-flow, lcd-flow, or an ablation: dmd2-t999, dmd2-nogan, dmd2-4step, "
                   "dmd2-4step-nogan, dmd2-pixel, dmd2-pixel-nogan, dmd2-pixel-4step, rglcd-lrm "
                   "(default: lcd-lora,dmd2)")
    g.add_argument("--all", action="store_true",
                   help="the main methods: seven on the VP teachers, DMD2 and LCD on the flow one")
    p.add_argument("--train-steps", type=_positive_int, default=None,
                   help="optimizer steps per method (default: each method's demo budget)")
    p.add_argument("--num-samples", type=_positive_int, default=1000,
                   help="samples per model and step count for the metrics")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="train the methods in this many worker processes (they split the CPU "
                   "threads; 2 on a 2-core machine halves the wall time)")
    p.add_argument("--effnet", action="store_true",
                   help="add FD-EffNetLite0 to the table (ImageNet net at 224 px: ~11 img/s "
                   "on 2 CPU cores)")
    p.add_argument("--no-teachers", action="store_true",
                   help="bench only the students (the teachers' rows are measured elsewhere, "
                   "e.g. configs/bench/world_teachers.yaml)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny batches and few samples: checks the path, measures nothing")
    for command in sub.choices.values():  # -v also after the command (python -m ...train)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging; tracebacks for errors")
    return ap


def cmd_train(args) -> int:
    from diffdistill.trainers import load_run_config

    cls, cfg = load_run_config(args.config, args.overrides)
    cls(cfg).fit(resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_export(args) -> int:
    from diffdistill.app.api import _export_checkpoint

    ckpt, out = _export_checkpoint(args.run_dir, args.out or None, args.checkpoint)
    print(f"exported {ckpt} -> {out}")
    return 0


def cmd_sample(args) -> int:
    from diffdistill.app.sample import sample_command

    return sample_command(args)


def cmd_demo(args) -> int:
    from diffdistill.app.demo import MAIN_METHODS, run_demo

    methods = list(MAIN_METHODS) if args.all else (
        [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None)
    flags = [("--all", args.all), (f"--methods {args.methods}", args.methods),
             (f"--train-steps {args.train_steps}", args.train_steps),
             (f"--num-samples {args.num_samples}", args.num_samples != 1000),
             (f"--out {args.out}", args.out != "runs/demo"),
             (f"--jobs {args.jobs}", args.jobs != 1), ("--effnet", args.effnet),
             ("--no-teachers", args.no_teachers), ("--smoke", args.smoke)]
    command = " ".join(["diffdistill demo", *(f for f, on in flags if on)])
    try:
        run_demo(out=args.out, methods=methods, train_steps=args.train_steps,
                 num_samples=args.num_samples, tiny=args.smoke, jobs=args.jobs,
                 effnet=args.effnet, teachers=not args.no_teachers, command=command)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    from diffdistill.eval.harness import bench_command

    return bench_command(args.config, args.overrides)


def cmd_convergence(args) -> int:
    from diffdistill.eval.convergence import collect, write_convergence

    runs = {}
    for item in args.runs:
        label, _, folder = item.rpartition("=")
        folder = Path(folder)
        if not (folder / "metrics.jsonl").is_file():
            print(f"error: {folder} has no metrics.jsonl; give a training output_dir",
                  file=sys.stderr)
            return 2
        runs[label or folder.name] = folder
    curves = collect(runs)
    if not curves:
        print("error: none of these runs logged a periodic evaluation (set eval.every)",
              file=sys.stderr)
        return 2
    paths = write_convergence(curves, args.out)
    print(f"{len(curves)} curve(s) -> {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_world(args) -> int:
    from diffdistill.app.world_build import main_build

    return main_build(args)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (... --resume latest train.max_steps=9)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from diffdistill.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # libraries' bars and chatter: only with -v
    # The toolkit's own messages at INFO; other libraries' (open_clip logs to the root logger
    # on every model load) only from WARNING, unless -v.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("diffdistill").setLevel(logging.INFO)
    from diffdistill.config import ConfigError
    from diffdistill.errors import MirroredError, RunError, TrainingStopped

    handlers = {"train": cmd_train, "export": cmd_export, "sample": cmd_sample,
                "demo": cmd_demo, "world": cmd_world, "bench": cmd_bench,
                "convergence": cmd_convergence}
    try:
        return handlers[args.command](args)
    except TrainingStopped as e:  # not a failure: where to continue from (main process)
        if args.verbose:
            traceback.print_exc()
        if e.main_process:
            print(str(e), file=sys.stderr)
        return e.exit_code
    except MirroredError as e:  # another process failed and printed why
        if args.verbose:
            traceback.print_exc()
        return e.exit_code
    except (ConfigError, FileNotFoundError, RunError, OSError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, RunError) or not isinstance(
            e, (ConfigError, FileNotFoundError)) else 2


def _one_line(e: BaseException) -> str:
    """The message as one line (an OSError without one: its errno text and file)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    sys.exit(main())
