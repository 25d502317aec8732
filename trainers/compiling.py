"""``train.compile``: every network a trainer runs, compiled in place with ``torch.compile``.

The networks are found the way ``benchmarks/train_step.py`` times them
(:func:`find_networks`: the trainer's top-level modules, looked up through its attributes, its
backbone and helper objects) and compiled with ``nn.Module.compile()``, which swaps the
module's call for a compiled one and keeps the module itself. So the state-dict keys,
checkpoints, resume, EMAs, θ⁻ copies and exports see the same module as in an eager run.

How the recompilation pitfalls are handled:

* **one network, several roles** — LCM-LoRA's teacher is the student with its LoRA disabled,
  θ⁻ runs it under ``no_grad``, the sample grid in eval mode: dynamo guards on the adapters'
  flags, the grad mode and ``training`` and keeps one graph per combination; the
  recompile limit is raised (:data:`RECOMPILE_LIMIT`) so that none of them falls back to eager;
* **EMA swaps** — EMAs and θ⁻ copy into the parameters in place (:mod:`.ema`), which changes
  no guard;
* **batch sizes** — training batches have one size (``drop_last``); an evaluation batch of
  another size compiles once more (dynamo's automatic dynamic shapes), the training graph is
  kept;
* **entry points other than forward** — a VAE runs through ``encode`` / ``decode``: its
  ``encoder`` and ``decoder`` are compiled instead of the autoencoder;
* **text encoders are left eager**: prompts are encoded once and cached, with a varying
  number of prompts per call — compiling them would only cost compile time;
* **networks that take strings** (a CLIP-style reward's forward takes the prompts: a graph
  would guard on their values and recompile for every batch) name their tensor-only parts
  in ``compile_parts()`` — the reward's image tower.

Sharded runs (FSDP, DeepSpeed) are refused: the combination has not run here
(:meth:`Trainer.setup` says so before any network loads).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

#: dynamo's per-function graph cache: enough for every (train / eval) × (grad / no_grad) ×
#: (adapter on / off) × (training / evaluation batch size) combination a trainer uses
RECOMPILE_LIMIT = 64

#: network methods that run a network without going through ``forward`` (the VAE)
ENTRY_METHODS = ("encode", "decode")


def find_networks(trainer) -> dict[int, tuple[str, nn.Module]]:
    """The trainer's top-level networks: id -> (shortest attribute path, module).

    Breadth-first over the trainer's attributes, descending into dicts, lists, tuples and
    diffdistill helper objects (the backbone, reward terms, EMAs). An ``nn.Module`` found is
    a network — except the Denoiser / LCMConsistency wrappers, which are looked through —
    and its submodules are not visited (they run inside it)."""
    from diffdistill.denoiser import DenoiserBase

    found: dict[int, tuple[str, nn.Module]] = {}
    seen: set[int] = set()
    queue: list[tuple[str, object]] = [(k, v) for k, v in vars(trainer).items()]
    while queue:
        nxt: list[tuple[str, object]] = []
        for path, obj in queue:
            if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool)):
                continue
            seen.add(id(obj))
            if isinstance(obj, DenoiserBase):
                nxt += [(f"{path}.{n}", c) for n, c in obj.named_children()]
            elif isinstance(obj, nn.Module):
                found.setdefault(id(obj), (path, obj))
            elif isinstance(obj, dict):
                nxt += [(f"{path}[{k}]", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple)):
                nxt += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
            elif (type(obj).__module__.startswith("diffdistill")
                  and hasattr(obj, "__dict__") and not isinstance(obj, type)):
                nxt += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
        queue = nxt
    return found


def is_text_encoder(path: str) -> bool:
    """A backbone's text encoder (``text_encoder``, ``text_encoder_2``, …), by where it is."""
    return path.rsplit(".", 1)[-1].startswith("text_encoder")


def compile_targets(path: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """What to compile for one network: the module itself, a VAE's encoder and decoder
    (it runs through ``encode`` / ``decode``), nothing for a text encoder, and what a network
    names in its ``compile_parts()`` (a CLIP-style reward: its image tower)."""
    if is_text_encoder(path):
        return []
    if callable(getattr(module, "compile_parts", None)):
        return [(f"{path}.{name}", part) for name, part in module.compile_parts()]
    if any(callable(getattr(module, m, None)) for m in ENTRY_METHODS):
        parts = [(f"{path}.{n}", getattr(module, n)) for n in ("encoder", "decoder")
                 if isinstance(getattr(module, n, None), nn.Module)]
        if parts:
            return parts
    return [(path, module)]


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_networks(trainer, unwrap=None, mode: Optional[str] = None) -> list[str]:
    """Compile every network of ``trainer`` in place (see the module docstring); returns the
    attribute paths compiled. ``unwrap`` strips a DDP wrapper (the inner module is compiled:
    the wrapper calls it, and a side pass calls it directly)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across releases
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), RECOMPILE_LIMIT))
    unwrap = unwrap or (lambda m: m)
    done: list[str] = []
    compiled: set[int] = set()
    for path, network in sorted(find_networks(trainer).values(), key=lambda pm: pm[0]):
        for name, module in compile_targets(path, unwrap(network)):
            if id(module) in compiled or is_compiled(module):
                continue
            module.compile(mode=mode)
            compiled.add(id(module))
            done.append(name)
    return done
