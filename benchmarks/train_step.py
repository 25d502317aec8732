"""Training-step overhead: each trainer's step time against the time of its own network work.

Every trainer runs its shipped toy config (``configs/<method>/toy*.yaml``) on the embedded
world (``world:teacher_latent``; iCT: ``world:teacher_pixel``), loaded through
:func:`diffdistill.trainers.load_run_config` with checkpoints, grids, periodic evaluation,
tensorboard and the progress bar off, and steps through
:meth:`~diffdistill.trainers.base.Trainer.train_iteration` — exactly one iteration of
``Trainer.fit``: the data batch, ``train_step`` (forwards, losses, ``self.step``: backward,
clipping, optimizer), the EMA updates and the logs' conversion to floats.

**Step**: wall time of one ``train_iteration`` (CUDA: synchronised before and after).

**Floor**: the time of the step's own network work, measured inside that same step:

* *forward* — every call of a top-level network: a ``torch.nn.Module`` the trainer holds
  (found by walking its attributes, its backbone and helper objects; the
  :class:`~diffdistill.denoiser.Denoiser` wrappers are looked through, not counted — their
  x0/ε arithmetic is the trainer's own work): the UNets (student, teacher, θ⁻ target, fake
  score with its GAN head), the VAE (its ``encode`` / ``decode`` entry points), text encoders,
  a discriminator head, a reward model, a latent reward model, LPIPS. Timed between forward
  pre/post hooks on those modules, **outermost calls only**: a network running inside
  another timed network (the GAN head inside the fake score's forward, a UNet inside a reward
  model) is not counted twice, and nothing is counted while a backward runs (activation
  checkpointing's recomputation is part of the backward);
* *backward* — every ``torch.autograd.backward`` (``loss.backward()`` through
  ``accelerator.backward``) and ``torch.autograd.grad`` call (f-distill's R1 penalty);
* *optimizer* — ``accelerator.clip_grad_norm_`` plus ``optimizer.step()`` (step pre/post hooks
  on each torch optimizer).

floor = forward + backward + optimizer; overhead = step / floor. The rest of the step is
split into *data* (``next(batches)``: loading, collating, the host-to-device copy), *ema*
(``update_emas``) and *other* (everything else: the trainer's tensor glue — noising, CFG
mixing, losses, the DDIM solver step — host syncs, RNG draws, Python). Definition and hooks
are the same for every trainer. The hooks cost a few microseconds per network call and are
inside the step time (they can only raise step/floor).

On CPU the regions are timed with ``time.perf_counter``. On CUDA with CUDA events (the time
between the region's start and end on the stream, so host work hidden behind queued GPU work
counts as nothing, and a network's forward includes the gaps its kernel launches leave); the
step is still host wall time, so step/floor also charges GPU idle time to the overhead.

The table's last column is each network's outermost calls per step (mean over the last
round; the VAE encodes in chunks of 16 images, so a batch of 32 is two encoder calls;
text-encoder calls are prompt-cache misses). ``--json`` keeps every step's breakdown.

Each case is built once; then ``--rounds`` rounds run ``--steps`` consecutive iterations of
every case in turn (interleaved, after ``--warmup`` untimed iterations). A round's figure is
the mean of its steps — ``--steps 5`` covers one full two-time-scale cycle of the toy DMD2 /
f-distill / Hyper-SD-DM recipes (the generator updates every 5th step) — and the table shows
the median over rounds; step/floor is the median of the rounds' ratios.

    python benchmarks/train_step.py [--cases lcd dmd2 ...] [--rounds 5] [--steps 5]
        [--warmup 5] [--batch N] [--set KEY=VALUE] [--device cpu|cuda] [--threads N]
        [--json out.json]
    python benchmarks/train_step.py --profile lcd   # cProfile of a few steps of one case
    python benchmarks/train_step.py --compile --cases lcd-lora ...  # train.compile vs eager

``--compile`` runs every case twice, eager and with ``train.compile=true`` (the compiled
twin right after the eager one in every round, same seed and batches, timed without the
hooks: dynamo would trace them). Its table gives the step times, compiled / eager (median of
the rounds' ratios), the compile time (the warm-up's wall time beyond as many compiled
steps) and the loss drift (largest relative difference of the logged losses, compiled vs
eager, over the warm-up and over the whole run: the two runs see the same batches and noise,
so this is the compiled arithmetic's effect on the training trajectory).

The target is step/floor <= 1.15.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffdistill.trainers.compiling import ENTRY_METHODS, find_networks

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    config: str  # relative to the repository root
    overrides: tuple[str, ...] = ()
    start_step: int = 0  # global_step to start at (Hyper-SD: picks the stage)
    latent: bool = True  # on world:teacher_latent (``--model`` replaces it); False: pixel


#: the LoRA of the shipped LoRA toys (lcd/toy_lora, hypersd/toy) for the opt-in LoRA cases
LORA = ("adapter.type=lora", "adapter.rank=16", "adapter.alpha=16", "adapter.conv=true",
        "adapter.ff=true")

#: name -> the toy config it runs. DEFAULT_CASES run by default; the rest are opt-in.
CASES: dict[str, Case] = {
    # the world's latent teacher trained on; its latent cache off, so that it encodes every
    # batch as all the other latent toys do (cache hits would take the VAE out of its step)
    "pretrain": Case("configs/pretrain/toy_latent.yaml",
                     ("model.path=world:teacher_latent", "data.cache_dir=null")),
    "ict": Case("configs/ict/toy.yaml", latent=False),
    "lcd": Case("configs/lcd/toy.yaml"),
    "lcd-lora": Case("configs/lcd/toy_lora.yaml"),
    "rglcd": Case("configs/rglcd/toy.yaml"),
    "dmd2": Case("configs/dmd2/toy.yaml"),
    "fdistill": Case("configs/fdistill/toy.yaml"),
    "hypersd": Case("configs/hypersd/toy.yaml"),
    # opt-in variants
    "pretrain-pixel": Case("configs/pretrain/toy_pixel.yaml",
                           ("model.path=world:teacher_pixel",), latent=False),
    "ict-lora": Case("configs/ict/toy.yaml", LORA, latent=False),
    "rglcd-lora": Case("configs/rglcd/toy.yaml", LORA + ("lcd.guidance_scale=1.0",)),
    "rglcd-lrm": Case("configs/rglcd/toy_lrm.yaml"),
    "dmd2-lora": Case("configs/dmd2/toy.yaml", LORA),
    "fdistill-lora": Case("configs/fdistill/toy.yaml", LORA),
    "hypersd-full": Case("configs/hypersd/toy.yaml", ("adapter.type=full",)),
    "hypersd-reward": Case("configs/hypersd/toy.yaml", start_step=1000),  # stage 2: ReFL
    "hypersd-dm": Case("configs/hypersd/toy.yaml", start_step=2000),  # stage 4: one-step DMD
}
DEFAULT_CASES = ["pretrain", "ict", "lcd", "lcd-lora", "rglcd", "dmd2", "fdistill", "hypersd"]

#: what every case turns off: nothing but training steps run
QUIET = ("train.checkpoint_every=0", "log.progress=false", "log.tensorboard=false",
         "eval.every=0", "log.grid_every=0")


def case_overrides(case: Case, out_dir, device: str = "cpu", batch: int | None = None,
                   model: str | None = None, extra=()) -> list[str]:
    ov = [*QUIET, f"output_dir={out_dir}", *case.overrides]
    if device == "cpu":
        ov.append("train.cpu=true")
    if batch is not None:
        ov.append(f"train.batch_size={batch}")
    if model is not None and case.latent:  # another SD-structured latent model
        ov.append(f"model.path={model}")
    return ov + list(extra)


def build_trainer(case: Case, out_dir, device: str = "cpu", batch: int | None = None,
                  model: str | None = None, extra=()):
    """(trainer after ``setup()`` at ``case.start_step``, its batch iterator)."""
    from diffdistill.trainers import load_run_config

    cls, cfg = load_run_config(ROOT / case.config,
                               case_overrides(case, out_dir, device, batch, model, extra))
    tr = cls(cfg)
    tr.setup()
    tr.global_step = case.start_step
    return tr, tr._batches()


class _Clock:
    """Marks on CPU (perf_counter seconds) or CUDA (recorded events); spans in ms."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        return (b - a) * 1e3 if not self.cuda else a.elapsed_time(b)


class StepRecorder:
    """Hooks that time one trainer's network work (see the module docstring); use as a
    context manager around the iterations, then :meth:`step` for each one."""

    def __init__(self, trainer, cuda: bool = False, hooks: bool = True):
        self.trainer = trainer
        # a compiled trainer is timed without hooks: dynamo would trace them into its graphs
        self.hooks = hooks
        self.logs: dict[str, float] = {}  # the last iteration's logged scalars
        self.clock = _Clock(cuda)
        self.cuda = cuda
        self.networks = find_networks(trainer)
        self._handles: list = []
        self._restore: list = []
        self._depth = 0
        self._in_backward = 0
        self._open = None
        self.spans: list[tuple[str, str, object, object]] = []  # (category, name, a, b)

    # -- hooks --------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        if self._in_backward:
            return
        self._depth += 1
        if self._depth == 1:
            self._open = (name, self.clock.mark())

    def _exit(self) -> None:
        if self._in_backward or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            name, a = self._open
            self.spans.append(("forward", name, a, self.clock.mark()))

    def _timed(self, category: str, fn, backward: bool = False, name: str | None = None):
        rec, name = self, name or category

        def wrapper(*args, **kwargs):
            a = rec.clock.mark()
            if backward:
                rec._in_backward += 1
            try:
                return fn(*args, **kwargs)
            finally:
                if backward:
                    rec._in_backward -= 1
                if not (backward and rec._in_backward):  # nested: count the outer one
                    rec.spans.append((category, name, a, rec.clock.mark()))
        return wrapper

    def _entry_method(self, name: str, fn):
        rec = self

        def wrapper(*args, **kwargs):
            rec._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                rec._exit()
        return wrapper

    def _patch(self, obj, attr: str, new) -> None:
        had = attr in vars(obj)
        old = vars(obj)[attr] if had else None
        setattr(obj, attr, new)
        self._restore.append((obj, attr, had, old))

    def __enter__(self):
        if not self.hooks:
            return self
        for path, module in self.networks.values():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, p=path: self._enter(p)))
            self._handles.append(module.register_forward_hook(
                lambda m, a, o: self._exit(), always_call=True))
            for meth in ENTRY_METHODS:
                if callable(getattr(module, meth, None)):
                    self._patch(module, meth, self._entry_method(path, getattr(module, meth)))
        for opt in self.trainer.optimizers.values():
            inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer
            marks: list = []
            self._handles.append(inner.register_step_pre_hook(
                lambda o, a, k, marks=marks: marks.append(self.clock.mark())))
            self._handles.append(inner.register_step_post_hook(
                lambda o, a, k, marks=marks: self.spans.append(
                    ("optimizer", "optimizer", marks.pop(), self.clock.mark()))))
        acc = self.trainer.accelerator
        self._patch(acc, "clip_grad_norm_", self._timed("optimizer", acc.clip_grad_norm_,
                                                        name="clip_grad_norm"))
        self._patch(torch.autograd, "backward",
                    self._timed("backward", torch.autograd.backward, backward=True))
        self._patch(torch.autograd, "grad",
                    self._timed("backward", torch.autograd.grad, backward=True))
        self._patch(self.trainer, "update_emas", self._timed("ema", self.trainer.update_emas))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, had, old in reversed(self._restore):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._restore.clear()

    # -- one iteration ------------------------------------------------------------------
    def step(self, batches) -> dict:
        """Run and time one ``train_iteration``; returns its breakdown (ms) and call counts."""
        rec = self

        class TimedBatches:
            def __next__(self):
                a = rec.clock.mark()
                try:
                    return next(batches)
                finally:
                    rec.spans.append(("data", "data", a, rec.clock.mark()))

        self.spans = []
        self._depth = 0
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.logs = self.trainer.train_iteration(TimedBatches())
        if self.cuda:
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) * 1e3
        parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "data": 0.0, "ema": 0.0}
        per_net: dict[str, float] = {}
        calls: dict[str, int] = {}
        counts = {"backward": 0, "optimizer": 0, "clip_grad_norm": 0}
        for cat, name, a, b in self.spans:
            ms = self.clock.ms(a, b)
            parts[cat] += ms
            if cat == "forward":
                per_net[name] = per_net.get(name, 0.0) + ms
                calls[name] = calls.get(name, 0) + 1
            elif name in counts:
                counts[name] += 1
        floor = parts["forward"] + parts["backward"] + parts["optimizer"]
        other = step_ms - floor - parts["data"] - parts["ema"]
        return {"step_ms": step_ms, "floor_ms": floor or float("nan"),
                **{f"{k}_ms": v for k, v in parts.items()},
                "other_ms": other, "forward_ms_by_network": per_net, "forward_calls": calls,
                "backward_calls": counts["backward"], "optimizer_steps": counts["optimizer"],
                "clip_calls": counts["clip_grad_norm"]}


# ----------------------------------------------------------------------------- the run


@dataclass
class Result:
    case: str
    config: str
    adapter: str
    batch: int
    rounds: list[dict] = field(default_factory=list)  # per round: means of its steps
    steps: list[dict] = field(default_factory=list)  # every timed step
    warmup_s: list[float] = field(default_factory=list)  # each warm-up iteration's wall time
    losses: list[dict] = field(default_factory=list)  # every iteration's loss* scalars

    def summary(self) -> dict:
        med = {k: statistics.median(r[k] for r in self.rounds)
               for k in ("step_ms", "floor_ms", "forward_ms", "backward_ms", "optimizer_ms",
                         "data_ms", "ema_ms", "other_ms")}
        ratio = statistics.median(r["step_ms"] / r["floor_ms"] for r in self.rounds)
        costs = {k: med[f"{k}_ms"] for k in ("data", "ema", "other")}
        top = max(costs, key=costs.get)
        return {"case": self.case, "config": self.config, "adapter": self.adapter,
                "batch": self.batch, **med, "step_over_floor": ratio,
                "top_non_network": top, "top_non_network_ms": costs[top],
                "forward_calls_per_step": self.calls_per_step(), "rounds": len(self.rounds)}

    def calls_per_step(self) -> dict[str, float]:
        """Mean outermost calls per step of each network over the last round (a two-time-
        scale cycle mixes steps with and without the generator update)."""
        last = self.steps[-(len(self.steps) // max(len(self.rounds), 1)):] if self.steps else []
        names = dict.fromkeys(n for s in last for n in s["forward_calls"])
        return {n: statistics.fmean(s["forward_calls"].get(n, 0) for s in last) for n in names}


def _mean_round(steps: list[dict]) -> dict:
    keys = [k for k, v in steps[0].items() if isinstance(v, float)]
    return {k: statistics.fmean(s[k] for s in steps) for k in keys}


#: the suffix of a case run with ``train.compile=true`` (``--compile``)
COMPILED = "+compile"


def _losses(logs: dict) -> dict[str, float]:
    return {k: v for k, v in logs.items() if k.startswith("loss")}


def run(cases: list[str], rounds: int = 5, steps: int = 5, warmup: int = 5,
        batch: int | None = None, device: str = "cpu", model: str | None = None,
        extra=(), out_root: str | None = None, log=print, compile: bool = False
        ) -> list[Result]:
    """Build every case, warm it up, then interleave ``rounds`` rounds of ``steps`` timed
    iterations per case. Returns one :class:`Result` per case. ``compile``: each case also
    runs with ``train.compile=true`` (named ``CASE+compile``, timed right after its eager
    twin, from the same seed and batches; the first warm-up iteration pays the compile)."""
    cuda = device == "cuda"
    names = [n for c in cases for n in ((c, c + COMPILED) if compile else (c,))]
    with contextlib.ExitStack() as stack:
        root = out_root or stack.enter_context(tempfile.TemporaryDirectory())
        built, results = {}, {}
        for name in names:
            base, compiled = name.removesuffix(COMPILED), name.endswith(COMPILED)
            t0 = time.perf_counter()
            tr, batches = build_trainer(CASES[base], Path(root) / name, device, batch, model,
                                        (*extra, "train.compile=true") if compiled else extra)
            res = results[name] = Result(name, CASES[base].config, tr.cfg.adapter.type,
                                         tr.cfg.train.batch_size)
            for _ in range(warmup):
                w0 = time.perf_counter()
                res.losses.append(_losses(tr.train_iteration(batches)))
                res.warmup_s.append(time.perf_counter() - w0)
            built[name] = (tr, batches, StepRecorder(tr, cuda, hooks=not compiled))
            log(f"built {name} ({tr.cfg.adapter.type}, batch {tr.cfg.train.batch_size}, "
                f"{len(built[name][2].networks)} networks) in {time.perf_counter() - t0:.1f} s")
        for r in range(rounds):
            for name in names:
                tr, batches, rec = built[name]
                with rec:
                    for _ in range(steps):
                        results[name].steps.append(rec.step(batches))
                        results[name].losses.append(_losses(rec.logs))
                results[name].rounds.append(_mean_round(results[name].steps[-steps:]))
            log(f"round {r + 1}/{rounds} done")
    return [results[n] for n in names]


def _loss_drift(eager: Result, comp: Result, first: int | None = None) -> float:
    """Largest relative difference of a logged loss, compiled vs eager (first iterations)."""
    worst = 0.0
    for a, b in list(zip(eager.losses, comp.losses))[:first]:
        for k, v in a.items():
            if k in b:
                worst = max(worst, abs(b[k] - v) / max(abs(v), 1e-12))
    return worst


def compile_rows(results: list[Result]) -> list[dict]:
    """Each compiled case against its eager twin: step times (medians over rounds), their
    ratio (median of the rounds' ratios: the two ran back to back in every round), the
    compile time (the warm-up's extra wall time over as many compiled steps) and how far the
    compiled losses drift from the eager ones (largest relative difference over the first
    ``warmup`` iterations, and over the whole run)."""
    by_name = {r.case: r for r in results}
    rows = []
    for comp in results:
        if not comp.case.endswith(COMPILED):
            continue
        eager = by_name[comp.case.removesuffix(COMPILED)]
        ratios = [c["step_ms"] / e["step_ms"] for c, e in zip(comp.rounds, eager.rounds)]
        step_c = statistics.median(r["step_ms"] for r in comp.rounds)

        rows.append({"case": eager.case, "adapter": eager.adapter, "batch": eager.batch,
                     "eager_step_ms": statistics.median(r["step_ms"] for r in eager.rounds),
                     "compiled_step_ms": step_c,
                     "compiled_over_eager": statistics.median(ratios),
                     "compile_s": sum(comp.warmup_s) - len(comp.warmup_s) * step_c / 1e3,
                     "loss_drift_warmup": _loss_drift(eager, comp, len(comp.warmup_s)),
                     "loss_drift_all": _loss_drift(eager, comp)})
    return rows


def compile_table(rows: list[dict]) -> str:
    lines = ["| trainer | adapter | batch | eager step ms | compiled step ms | compiled / eager "
             "| compile s | loss drift, warm-up / all steps |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['adapter']} | {r['batch']} | "
                     f"{r['eager_step_ms']:.1f} | {r['compiled_step_ms']:.1f} | "
                     f"**{r['compiled_over_eager']:.2f}** | {r['compile_s']:.0f} | "
                     f"{r['loss_drift_warmup']:.1e} / {r['loss_drift_all']:.1e} |")
    return "\n".join(lines)


def profile(name: str, steps: int = 5, warmup: int = 5, batch: int | None = None,
            device: str = "cpu", model: str | None = None, extra=(), top: int = 30) -> str:
    """cProfile of ``steps`` iterations of one case (sorted by own time)."""
    import cProfile
    import io
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        tr, batches = build_trainer(CASES[name], Path(tmp) / name, device, batch, model, extra)
        for _ in range(warmup):
            tr.train_iteration(batches)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            tr.train_iteration(batches)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def table(results: list[Result]) -> str:
    lines = [("| trainer | adapter | batch | step ms | floor ms | step/floor | fwd / bwd / opt ms "
              "| biggest non-network cost | forward calls per step |"),
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for res in results:
        if res.case.endswith(COMPILED):  # no hooks, no floor: see compile_table
            continue
        s = res.summary()
        calls = ", ".join(f"{k}×{v:g}" for k, v in s["forward_calls_per_step"].items())
        lines.append(
            f"| {s['case']} | {s['adapter']} | {s['batch']} | {s['step_ms']:.1f} | "
            f"{s['floor_ms']:.1f} | {s['step_over_floor']:.2f} | {s['forward_ms']:.1f} / "
            f"{s['backward_ms']:.1f} / {s['optimizer_ms']:.1f} | {s['top_non_network']} "
            f"{s['top_non_network_ms']:.1f} ms | {calls} |")
    return "\n".join(lines)


def add_case_arguments(ap) -> None:
    """The options that shape every case: ``--batch``, ``--model``, ``--set``, ``--device``
    (shared with ``benchmarks/train_memory.py``)."""
    ap.add_argument("--batch", type=int, default=None, help="override train.batch_size")
    ap.add_argument("--model", default=None,
                    help="model.path of the latent cases (an SD-structured folder)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every case (repeatable)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed iterations per case per round")
    ap.add_argument("--warmup", type=int, default=5)
    add_case_arguments(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--profile", default=None, choices=sorted(CASES),
                    help="print a cProfile of one case instead of the table")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="also run every case with train.compile=true, interleaved with its "
                         "eager twin; prints the compiled / eager table")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile(args.profile, args.steps, args.warmup, args.batch, args.device,
                      args.model, args.extra))
        return 0
    results = run(args.cases, args.rounds, args.steps, args.warmup, args.batch, args.device,
                  args.model, args.extra, log=lambda m: print(m, file=sys.stderr),
                  compile=args.compile)
    machine = {"cpu": platform.processor() or platform.machine(), "device": args.device,
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    print(f"{args.rounds} interleaved rounds x {args.steps} steps per case after "
          f"{args.warmup} warm-up steps; medians over rounds; {machine}")
    print(table(results))
    rows = compile_rows(results)
    if rows:
        print()
        print(compile_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "args": vars(args), "compile": rows,
             "results": [{**r.summary(), "per_round": r.rounds, "per_step": r.steps,
                          "warmup_s": r.warmup_s, "losses": r.losses}
                         for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
