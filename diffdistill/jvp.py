"""The one JVP of the backbone: a forward-mode directional derivative of any denoiser-ish callable.

Continuous-time consistency models and flow maps need the *total* derivative of a network
output along a trajectory, not its gradient with respect to the weights:

* sCM / sCD (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
  Consistency Models", Eq. 8 and Alg. 1): dF_θ⁻(x_t̂/σ_d, t̂)/dt̂ along the PF-ODE, i.e. the JVP
  of F_θ⁻ with tangents (cos t̂·sin t̂·dx_t̂/dt̂, cos t̂·sin t̂) for the inputs (x_t̂, t̂),
  computed without gradient (θ⁻ = stopgrad θ).
* MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Eq. 6 and 8):
  du/dt = v·∂_z u + 0·∂_r u + 1·∂_t u — one JVP of u_θ(z, r, t) with tangents (v, 0, 1).

:func:`jvp` takes the callable, the primal inputs and a tangent per input (``None`` holds an
input constant, so any subset of inputs may vary) and returns ``(output, d_output)`` where
``d_output = Σ_i ∂output/∂input_i · tangent_i``. Two estimators:

* ``method="autograd"`` (default): ``torch.func.jvp`` (forward-mode AD, exact up to rounding)
  over a closure of the varying inputs; everything else the callable reads — the network's
  weights, the conditioning — is a constant of the closure. The fused scaled-dot-product
  attention kernels (flash / memory-efficient on GPU, ``_scaled_dot_product_flash_attention_
  for_cpu`` on CPU) have no forward-mode derivative, so the call runs inside
  ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` — only here, not in ordinary forwards.
  (rCM wrote a FlashAttention-2 JVP kernel instead; FastGen switches to the math path too.)
* ``method="finite_difference"``: the central difference
  ``(f(p + h·v) − f(p − h·v)) / 2h`` with ``h = fd_eps`` — two more forwards, no forward-mode
  support needed from any layer, O(h²) truncation error plus rounding of order
  ``machine_eps · |f| / h``. The three forwards see the same RNG state (dropout masks
  agree). FastGen's sCM offers the same switch (``use_jvp_finite_diff``).

``no_grad=True`` (sCM's θ⁻ pass) runs under ``torch.no_grad()``: neither output carries a
graph. With ``no_grad=False`` the output (and d_output) keep their autograd graph to the
weights, which MeanFlow uses (loss on u_θ, target built from a detached du/dt).

Precision: diffusers' timestep embeddings compute in float32 whatever the model dtype, which
bounds the precision of a derivative with respect to the time input (~1e-4 relative in
float64 models, measured; see ENVIRONMENT.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

Tensor = torch.Tensor

JVP_METHODS = ("autograd", "finite_difference")


def math_attention():
    """The context in which every ``scaled_dot_product_attention`` takes the math path (the
    one with forward-mode AD)."""
    return sdpa_kernel(SDPBackend.MATH)


def _check(primals: Sequence[Any], tangents: Sequence[Optional[Tensor]]) -> list[int]:
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primal inputs but {len(tangents)} tangents "
                         "(give None for an input held constant)")
    varying = [i for i, v in enumerate(tangents) if v is not None]
    if not varying:
        raise ValueError("jvp: every tangent is None; give a tangent for at least one input")
    for i in varying:
        p, v = primals[i], tangents[i]
        if not (isinstance(p, Tensor) and p.is_floating_point()):
            raise ValueError(f"jvp: input {i} has a tangent but is not a floating-point tensor")
        if not isinstance(v, Tensor) or v.shape != p.shape:
            raise ValueError(f"jvp: the tangent of input {i} must be a tensor of shape "
                             f"{tuple(p.shape)}, got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    return varying


def jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Optional[Tensor]],
    *,
    method: str = "autograd",
    no_grad: bool = True,
    fd_eps: float = 1e-3,
) -> tuple[Any, Any]:
    """``(fn(*primals), d fn(*primals)[tangents])``: the output and its directional derivative.

    ``fn`` maps the primals positionally to a tensor or a pytree of tensors (a tuple, a
    :class:`~diffdistill.denoiser.Prediction`); d_output has the same structure. ``tangents``
    has one entry per primal: a tensor of the primal's shape, or ``None`` to hold that input
    constant (non-tensor inputs such as a :class:`~diffdistill.denoiser.Cond` must be
    ``None``). A tangent's dtype is cast to its primal's. ``method``: ``"autograd"``
    (forward-mode AD, math attention) or ``"finite_difference"`` (central difference with
    step ``fd_eps`` along the tangent). ``no_grad``: run without building an autograd graph
    (the θ⁻ pass of sCM)."""
    if method not in JVP_METHODS:
        raise ValueError(f"jvp method={method!r} is unknown; use one of {JVP_METHODS}")
    if not fd_eps > 0:
        raise ValueError(f"jvp: fd_eps must be positive, got {fd_eps}")
    primals = tuple(primals)
    varying = _check(primals, tangents)
    tangents = tuple(None if v is None else v.to(primals[i].dtype)
                     for i, v in enumerate(tangents))
    grad_ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
    with grad_ctx:
        if method == "autograd":
            return _forward_ad(fn, primals, tangents, varying)
        return _central_difference(fn, primals, tangents, varying, fd_eps)


def _forward_ad(fn, primals, tangents, varying):
    def closed(*moving):
        args = list(primals)
        for i, p in zip(varying, moving):
            args[i] = p
        return fn(*args)

    with math_attention():
        return torch.func.jvp(closed, tuple(primals[i] for i in varying),
                              tuple(tangents[i] for i in varying))


def _devices(primals) -> list:
    return sorted({p.device for p in primals if isinstance(p, Tensor) and p.device.type == "cuda"},
                  key=str)


def _central_difference(fn, primals, tangents, varying, h):
    def shifted(sign: float):
        args = list(primals)
        for i in varying:
            args[i] = primals[i] + sign * h * tangents[i]
        return args

    devices = _devices(primals)
    # the shifted forwards start from the caller's RNG state and restore it, then the primal
    # forward runs from that same state: one dropout mask for all three, and the RNG is left
    # where a single forward (the autograd method) leaves it
    with torch.random.fork_rng(devices=devices):
        plus = fn(*shifted(1.0))
    with torch.random.fork_rng(devices=devices):
        minus = fn(*shifted(-1.0))
    out = fn(*primals)
    d_out = tree_map(lambda a, b: (a - b) / (2 * h) if isinstance(a, Tensor) else None,
                     plus, minus)
    return out, d_out
