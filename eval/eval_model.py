"""A generator as the evaluation samples it (:class:`EvalModel`), and loading one from a
bench entry the way ``diffdistill sample`` does (:func:`load_eval_model`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffdistill.eval.bench_config import BenchModel
    from diffdistill.eval.prompts import EvalPrompts


@dataclass
class EvalModel:
    """A generator as the harness samples it: the denoiser (LCM boundary already applied
    where the sampler needs it), its backbone (conditioning, decoding), the sampler and
    guidance. ``guidance_embedding``: the width of an LCM w-embedding (``time_cond_proj_dim``)
    — w = guidance_scale − 1 then enters as ``timestep_cond`` and no CFG pass runs.
    ``timesteps(steps)`` may give a grid (None: the sampler's default)."""

    name: str
    backbone: Any
    denoiser: Any
    sampler: str
    guidance_scale: float = 1.0
    guidance_embedding: int | None = None
    timesteps: Callable[[int], Any] | None = None
    sampler_opts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    compile: bool = False  # torch.compile the network (the first batch pays the compile)

    def grid_for(self, steps: int) -> torch.Tensor:
        from diffdistill.sampling import default_timesteps

        if self.timesteps is not None:
            ts = self.timesteps(steps)
            if ts is not None:
                return torch.as_tensor(ts, dtype=torch.float64)
        ts = default_timesteps(self.sampler, self.denoiser.schedule, steps)
        if len(ts) != steps:
            raise ValueError(f"model {self.name!r}: sampler {self.sampler!r} runs {len(ts)} "
                             f"step(s), but {steps} were asked for")
        return ts.to(torch.float64)

    def export_info(self, steps: int, more_steps: Sequence[int] = ()) -> dict:
        """How an export of this generator is sampled (``diffdistill_export.json``, read back by
        :func:`load_eval_model`): the sampler, guidance and options this spec samples with,
        the grid for ``steps`` and, as ``timesteps_by_steps``, for each of ``more_steps``. One
        spec gives the trainer's grids, its periodic evaluation and its export record."""
        info = {"sampler": self.sampler, "steps": int(steps),
                "guidance_scale": float(self.guidance_scale),
                "timesteps": self.grid_for(steps).tolist(),
                "timesteps_by_steps": {str(n): self.grid_for(n).tolist()
                                       for n in more_steps if n != steps},
                "guidance_embedding": self.guidance_embedding is not None}
        if self.sampler_opts:
            info["sampler_opts"] = dict(self.sampler_opts)
        return info

    @property
    def cfg_active(self) -> bool:
        return self.guidance_scale != 1.0 and self.guidance_embedding is None

    def cond(self, prompts: EvalPrompts, indices: Sequence[int]):
        """Conditioning for samples ``indices`` (their global positions)."""
        from diffdistill.denoiser import Cond, guidance_scale_embedding

        bb = self.backbone
        if bb.kind == "pixel":
            cond = None
            if bb.num_classes is not None:
                labels = [prompts.label(i, bb.num_classes) for i in indices]
                cond = bb.class_cond(labels, guidance=self.cfg_active)
        else:
            cond = bb.encode_prompts([prompts.caption(i) for i in indices],
                                     with_uncond=self.cfg_active)
        if self.guidance_embedding:
            w = torch.tensor([self.guidance_scale - 1.0])
            row = guidance_scale_embedding(w, self.guidance_embedding).to(bb.device)
            cond = (cond or Cond()).replace(timestep_cond=row.expand(len(indices), -1))
        return cond

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], num_steps: int, prompts: EvalPrompts | None = None,
               *, indices: Sequence[int] | None = None, resolution: int | None = None,
               batch_size: int | None = None, autocast_dtype: torch.dtype | None = None
               ) -> torch.Tensor:
        """uint8 images of samples ``indices`` (default 0..len(seeds)−1): sample ``indices[k]``
        from seed ``seeds[k]`` with prompt ``indices[k]`` (:meth:`cond`), through the shared
        sampler at this model's step grid and guidance — the one way a trainer's grid, its
        periodic metric, the bench and the world's teacher report draw a sample."""
        from diffdistill.eval.prompts import EvalPrompts

        from diffdistill.backbone import grid_shape
        from diffdistill.sampling import generate

        bb = self.backbone
        if resolution and resolution != bb.resolution:
            bb.set_resolution(resolution)  # a resolution-shifted flow (Flux) takes its μ
        prompts = prompts or EvalPrompts()
        indices = list(range(len(seeds))) if indices is None else list(indices)
        ts = self.grid_for(num_steps)
        return generate(self.denoiser, seeds=list(seeds),
                        shape=grid_shape(bb, resolution or bb.resolution),
                        cond_fn=lambda sl: self.cond(prompts, indices[sl]), sampler=self.sampler,
                        num_steps=len(ts), timesteps=ts,
                        guidance_scale=self.guidance_scale if self.cfg_active else 1.0,
                        batch_size=batch_size or len(indices),
                        decode=None if bb.kind == "pixel" else bb.decode_latents,
                        output="uint8", progress=False, autocast_dtype=autocast_dtype,
                        compile=self.compile, sampler_opts=self.sampler_options,
                        device=bb.device)

    @property
    def sampler_options(self) -> dict:
        """The backbone's options for this sampler (e.g. x0 clipping of a pixel teacher whose
        scheduler clips), overridden by the model's own ``sampler_opts``."""
        return {**self.backbone.sampler_options(self.sampler), **self.sampler_opts}


def load_eval_model(spec: BenchModel, *, device="cpu", dtype: torch.dtype = torch.float32
                    ) -> EvalModel:
    """Load a bench model entry (full folder, or base + LoRA) the way ``diffdistill sample``
    does: ``choose_sampler`` picks the export's recorded sampler, the recorded timesteps are
    used for the recorded step count (``timesteps_by_steps``: for further step counts), its
    ``sampler_opts`` are passed on, the recorded guidance (and TCD gamma) when the entry
    gives none, consistency samplers get the LCM boundary, and a UNet with a guidance
    embedding (``time_cond_proj_dim``) gets w = guidance − 1 instead of CFG."""
    from diffdistill.backbone import load_backbone
    from diffdistill.denoiser import LCMConsistency
    from diffdistill.export import choose_sampler, load_lora_into
    from diffdistill.world import resolve_model_path

    path = Path(resolve_model_path(spec.path))
    lora_dir = Path(spec.lora) if spec.lora else None
    bb = load_backbone(str(path), dtype=dtype, device=device)
    if lora_dir is not None:
        load_lora_into(bb.unet, lora_dir)
    bb.unet.requires_grad_(False).eval()
    sampler, info = choose_sampler(spec.sampler, path, lora_dir,
                                   bb.scheduler_config.get("_class_name", ""))
    model = bb.denoiser()
    if sampler in ("lcm", "onestep") and bb.prediction_type not in ("cm", "flow"):
        model = LCMConsistency(model)  # VP students: LCM's boundary, as LCMScheduler applies
    w_dim = getattr(bb.unet.config, "time_cond_proj_dim", None)
    embed = w_dim if (bb.kind != "pixel" and w_dim is not None) else None
    guidance = (spec.guidance_scale if spec.guidance_scale is not None
                else float(info.get("guidance_scale", 1.0)))
    opts = bb.sampler_options(sampler)
    if sampler == "tcd" and "gamma" in info:  # exports before sampler_opts recorded it
        opts["gamma"] = float(info["gamma"])
    opts.update(info.get("sampler_opts", {}))
    opts.update(spec.sampler_opts)
    grids = {}
    if info.get("timesteps"):
        grids[len(info["timesteps"])] = list(info["timesteps"])
    for ts in info.get("timesteps_by_steps", {}).values():  # more trained grids (iCT 2-step)
        grids[len(ts)] = list(ts)
    if spec.timesteps:
        grids[len(spec.timesteps)] = list(spec.timesteps)
    return EvalModel(name=spec.name, backbone=bb, denoiser=model, sampler=sampler,
                     guidance_scale=guidance, guidance_embedding=embed,
                     timesteps=grids.get, sampler_opts=opts, info=info)


def recorded_step_counts(info: dict) -> list[int]:
    """The step counts a bench entry without ``steps`` runs: every count a unified export
    serves (Hyper-SD's ``served_steps``), else its recorded count, else 4."""
    served = info.get("served_steps")
    if served:
        return [int(s) for s in served]
    return [int(info.get("steps", 4))]

