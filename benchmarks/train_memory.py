"""Peak memory of each trainer, full weights vs LoRA, on the embedded world's teachers.

One fresh process per (trainer, adapter): the trainer's shipped toy config (the cases of
``benchmarks/train_step.py``; batch size as shipped unless ``--batch``) is built and runs a
few training iterations (``Trainer.train_iteration``, i.e. ``fit``'s loop body). Reported:

* ``params_mb`` — exact: unique parameter storage of every network the trainer holds (UNets,
  θ⁻ copies, fake score and GAN head, VAE, text encoder, reward models), each storage once —
  a LoRA student's base is shared with its teacher pass, a shared-base fake score with both,
  an EMA-backed θ⁻ with its EMA;
* ``trainable_mb`` — the parameters the optimizers update; ``optimizer_state_mb`` — their
  AdamW moments after the steps (two per trainable parameter); ``ema_mb`` — EMA shadows that
  are not already counted as a network's parameters; gradients are freed after every step
  (``zero_grad(set_to_none=True)``) and show up only in the peak;
* ``build_mb`` — resident-set growth over ``setup()`` (loading, copies, adapters, data);
* ``peak_mb`` — the peak resident set during the steps (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` after ``setup()``) minus the resident set before ``setup()``;
  ``step_peak_mb`` — the same peak minus the resident set after ``setup()`` (what the steps
  add: activations, gradients, optimizer state). Libraries are imported before the baseline,
  so only the run's own memory counts.

On CUDA (``--device cuda``) ``torch.cuda.memory_allocated`` / ``max_memory_allocated``
replace the RSS figures.

DMD2 appears three times: full (generator, real score and fake score are three UNets), LoRA
with the fake score sharing the base UNet (``dmd2.fake_score_shares_base=true``, default) and
LoRA with the fake score on a second base copy (``false``). Hyper-SD runs one iteration in
each kind of stage of its toy schedule (TSCD at step 0, ReFL at step 1000, one-step DMD at
step 2000), so its peak covers all of them.

    python benchmarks/train_memory.py [--cases lcd-full lcd-lora ...] [--batch N]
        [--set KEY=VALUE] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # the shared case table and trainer construction

LORA = train_step.LORA  # rank 16 on attention, projections, convolutions, feed-forward


@dataclass(frozen=True)
class MemoryCase:
    step_case: str  # a train_step.CASES entry
    overrides: tuple[str, ...] = ()
    steps: tuple[int, ...] = (0, 1)  # global steps to run (DMD2: 0 = generator + fake update)


CASES: dict[str, MemoryCase] = {
    "pretrain-full": MemoryCase("pretrain"),
    "ict-full": MemoryCase("ict"),
    "ict-lora": MemoryCase("ict", LORA),
    "lcd-full": MemoryCase("lcd"),
    "lcd-lora": MemoryCase("lcd-lora"),
    "rglcd-full": MemoryCase("rglcd"),
    "rglcd-lora": MemoryCase("rglcd-lora"),
    "dmd2-full": MemoryCase("dmd2"),
    "dmd2-lora-shared-base": MemoryCase("dmd2", LORA + ("dmd2.fake_score_shares_base=true",)),
    "dmd2-lora-two-bases": MemoryCase("dmd2", LORA + ("dmd2.fake_score_shares_base=false",)),
    "fdistill-full": MemoryCase("fdistill"),
    "fdistill-lora": MemoryCase("fdistill", LORA),
    "hypersd-full": MemoryCase("hypersd", ("adapter.type=full",), steps=(0, 1000, 2000)),
    "hypersd-lora": MemoryCase("hypersd", steps=(0, 1000, 2000)),
}

MB = 1 / 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _preimport() -> None:
    """Import what building a trainer imports, so the baseline includes the libraries."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    import diffdistill.trainers  # noqa: F401


def tensor_accounting(tr) -> dict:
    """Exact bytes (MB) of the trainer's parameters, trainable parameters, optimizer state
    and EMA shadows (unique storages; see the module docstring)."""
    import torch

    params: dict[int, int] = {}
    for _, module in train_step.find_networks(tr).values():
        for p in module.parameters():
            params.setdefault(p.data_ptr(), p.numel() * p.element_size())
    trainable: dict[int, int] = {}
    for ps in tr.trainable.values():
        for p in ps:
            trainable.setdefault(id(p), p.numel() * p.element_size())
    opt = sum(v.numel() * v.element_size() for o in tr.optimizers.values()
              for st in o.state.values() for v in st.values()
              if torch.is_tensor(v) and v.ndim > 0)
    ema: dict[int, int] = {}
    for e, _ in tr.emas.values():
        for t in e.shadow.values():
            if t.data_ptr() not in params:
                ema.setdefault(t.data_ptr(), t.numel() * t.element_size())
    return {"params_mb": sum(params.values()) * MB, "trainable_mb": sum(trainable.values()) * MB,
            "optimizer_state_mb": opt * MB, "ema_mb": sum(ema.values()) * MB}


def run_case(name: str, out: str, device: str = "cpu", batch: int | None = None,
             model: str | None = None, extra=()) -> dict:
    """One case in this process (a fresh child process of :func:`main`)."""
    import torch

    torch.set_num_threads(1)
    _preimport()
    mc = CASES[name]
    case = train_step.CASES[mc.step_case]
    cuda = device == "cuda"

    def now() -> int:
        return torch.cuda.memory_allocated() if cuda else _status_kb("VmRSS") * 1024

    before = now()
    tr, batches = train_step.build_trainer(case, out, device, batch, model,
                                           (*mc.overrides, *extra))
    built = now()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for step in mc.steps:
        tr.global_step = step
        tr.train_iteration(batches)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"case": name, "config": case.config, "adapter": tr.cfg.adapter.type,
            "batch": tr.cfg.train.batch_size, "device": device, "steps": list(mc.steps),
            **tensor_accounting(tr), "build_mb": (built - before) * MB,
            "peak_mb": (peak - before) * MB, "step_peak_mb": (peak - built) * MB}


def measure(names: list[str], device: str = "cpu", batch: int | None = None,
            model: str | None = None, extra=(), log=None) -> list[dict]:
    """Each case in its own fresh process; returns their results."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cmd = [sys.executable, __file__, "--device", device, "--_child", name,
                   str(Path(tmp) / name)]
            if batch is not None:
                cmd += ["--batch", str(batch)]
            if model is not None:
                cmd += ["--model", model]
            cmd += [f"--set={kv}" for kv in extra]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
            rows.append(json.loads(line[len("RESULT "):]))
            if log:
                log(f"{name}: peak {rows[-1]['peak_mb']:.1f} MB")
    return rows


def table(rows: list[dict]) -> str:
    unit = "allocated" if rows and rows[0]["device"] == "cuda" else "RSS"
    lines = [(f"| case | adapter | batch | params MB | trainable MB | Adam state MB | EMA MB | "
              f"build {unit} MB | peak {unit} MB | peak over built MB |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['adapter']} | {r['batch']} | {r['params_mb']:.2f} | "
                     f"{r['trainable_mb']:.2f} | {r['optimizer_state_mb']:.2f} | "
                     f"{r['ema_mb']:.2f} | {r['build_mb']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['step_peak_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    train_step.add_case_arguments(ap)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_child", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print("RESULT " + json.dumps(run_case(*args._child, device=args.device,
                                              batch=args.batch, model=args.model,
                                              extra=args.extra)))
        return 0
    rows = measure(args.cases, args.device, args.batch, args.model, args.extra,
                   log=lambda m: print(m, file=sys.stderr))
    print(f"memory per (trainer, adapter), one fresh process each, {args.device}, "
          f"one intra-op thread")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
