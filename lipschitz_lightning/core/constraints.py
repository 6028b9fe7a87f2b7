"""Weight constraints (SPEC §4, §6): projections that keep a weight matrix in a norm ball.

Pure torch, no Lightning. Every function takes and returns tensors and batches over leading
dimensions (a stack of matrices has shape ``(..., fanout, fanin)``).

Two layers of API:

- bare matrix functions (``orthogonalize``, ``soft_cap``, ``spectral_hammer`` ...) act on ``M``
  exactly as written in SPEC §6, with no ``scale`` or ``w_max`` rescaling;
- ``project_linear`` applies one method to a layer's weight ``W`` with the SPEC's unit
  conventions (act on ``W / scale``, or on ``W / (scale * w_max)`` for the methods that cap at 1).

Adding a constraint means one function registered with ``register_constraint`` plus one yaml
file in ``conf/constraint/`` (docs/constraints.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lipschitz_lightning.core.linalg import (  # noqa: F401  (the constraints' API: Newton-Schulz is one of them)
    GRAM_RESTART,
    NS_COEFFICIENTS,
    POLYNOMIAL_FORMS,
    POWER_ITERATION_SEED,
    RowShard,
    _gram_of,
    _is_wide,
    _rank_one,
    layer_scale,
    ns_max_singular_value,
    odd_polynomial_bound,
    odd_polynomial_steps,
    orthogonalize,
    random_start_vector,
    sigma_upper_bound,
    spectral_norms,
    top_singular_triplet,
)

# --------------------------------------------------------------------------------------------
# Bare matrix functions (SPEC §6 table; no scale, no w_max rescaling)
# --------------------------------------------------------------------------------------------

HARD_CAP_COEFFICIENTS = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)


def hard_cap(M: Tensor, form: str = "auto", shard: RowShard | None = None) -> Tensor:
    """Polynomial approximation of ``min(1, sigma)`` on every singular value."""
    transpose = not _is_wide(M, shard)
    X = M.mT if transpose else M
    X = odd_polynomial_steps(X, HARD_CAP_COEFFICIENTS, form, shard)
    return X.mT if transpose else X


def soft_cap(M: Tensor, alpha: float | Tensor, form: str = "auto", shard: RowShard | None = None) -> Tensor:
    """Two polynomial steps that pull large singular values down: ``s - a s^3`` then ``s + a s^3``."""
    transpose = not _is_wide(M, shard)
    X = M.mT if transpose else M
    X = odd_polynomial_steps(X, ((1.0, -alpha, 0.0), (1.0, alpha, 0.0)), form, shard)
    return X.mT if transpose else X


def svd_cap(M: Tensor, w_max: float | Tensor, shard: RowShard | None = None) -> Tensor:
    """Exact ``U diag(min(s, w_max)) V^T``: slow, the ground truth. A tensor ``w_max`` of shape
    ``(matrices, 1)`` caps each matrix of a stack at its own value. Split (``shard``): the same map
    as ``M V diag(min(1, w_max / s)) V^T`` from the summed Gram matrix's eigenvectors, in float64."""
    if M.dtype in (torch.bfloat16, torch.float16):  # no 16-bit SVD: compute in float32, round after
        return svd_cap(M.float(), w_max.float() if isinstance(w_max, Tensor) else w_max, shard).to(M.dtype)
    if shard is not None:
        X = M.double()
        eigenvalues, V = torch.linalg.eigh(shard.sum(X.mT @ X))
        s = eigenvalues.clamp(min=0).sqrt()
        cap = w_max.double() if isinstance(w_max, Tensor) else w_max
        factor = torch.where(s > cap, cap / s.clamp(min=1e-300), torch.ones_like(s))
        return (((X @ V) * factor.unsqueeze(-2)) @ V.mT).to(M.dtype)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * S.clamp(max=w_max).unsqueeze(-2)) @ Vh


def spectral_normalize(M: Tensor, iters: int = 16, state: Tensor | None = None, shard: RowShard | None = None) -> Tensor:
    """``M / max(1, sigma_max)`` with ``sigma_max`` from power iteration (Miyato et al. 2018)."""
    _, sigma, _ = top_singular_triplet(M, iters, state, shard)
    return M / sigma.clamp(min=1.0)[..., None, None]


def spectral_hammer(M: Tensor, w_max: float, iters: int = 16, state: Tensor | None = None, shard: RowShard | None = None) -> Tensor:
    """Set the largest singular value to exactly ``w_max``; the others are left alone."""
    u, sigma, v = top_singular_triplet(M, iters, state, shard)
    return M + (w_max - sigma)[..., None, None] * _rank_one(u, v)


def spectral_weight_decay(M: Tensor, strength: float, iters: int = 16, state: Tensor | None = None,
                          shard: RowShard | None = None) -> Tensor:
    """Decay only the top singular value: ``M - strength * sigma u v^T``."""
    u, sigma, v = top_singular_triplet(M, iters, state, shard)
    return M - (strength * sigma)[..., None, None] * _rank_one(u, v)


@functools.lru_cache(maxsize=4096)
def soft_cap_coupling(w_max: float, wd: float, max_update_norm: float) -> float:
    """The soft cap strength ``alpha`` that maps a singular value ``k`` exactly to ``w_max`` (§6.1).

    ``k = w_max (1 - wd) + max_update_norm`` is the largest singular value a weight at most
    ``w_max`` can reach after the decay and one step; ``alpha`` is the smallest real non-negative
    root of ``-k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 + (k - w_max)``, or 1 when there is none.
    Cached: with a constant learning rate every step asks for the same few values.
    """
    k = w_max * (1.0 - wd) + max_update_norm
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - w_max])
    real = roots.real[(np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))) & (roots.real >= 0)]
    return float(real.min()) if real.size else 1.0


def soft_cap_is_monotone(alpha: float, k: float) -> bool:
    """The soft cap's guarantee (a singular value <= k ends <= w_max) needs its scalar map
    ``s -> (s - a s^3) + a (s - a s^3)^3`` increasing on [0, k]: ``a k^2 <= 1/3``. Past that, a
    singular value below k can end above w_max."""
    return alpha * k * k <= 1 / 3


# The hard cap's polynomial explodes past its range (p(5) ~ 6e126): a matrix whose top singular
# value may exceed this takes the exact cap instead. Below it the output's singular values are
# proven at most hard_cap_bound() (1.0109; the polynomial also dips to -1.0109 near 4).
HARD_CAP_SAFE_SIGMA = 4.0


@functools.lru_cache(maxsize=None)
def hard_cap_bound() -> float:
    """The largest singular value the hard cap can output for inputs of spectral norm at most
    ``HARD_CAP_SAFE_SIGMA`` (in ``w_max`` units), proven by ``odd_polynomial_bound``."""
    return odd_polynomial_bound(HARD_CAP_COEFFICIENTS, HARD_CAP_SAFE_SIGMA)


# --------------------------------------------------------------------------------------------
# Embeddings (SPEC §4, §6.2)
# --------------------------------------------------------------------------------------------


def normalize_token_vectors(E: Tensor, inflation: float = 1.0, dim: int = -1) -> Tensor:
    """``e / max(1/inflation, rms(e))`` for every token vector ``e`` along ``dim``.

    With ``inflation = 1`` this is the embedding projection of §6.2 (token RMS at most 1);
    with the inflation factor it is Muon's embedding dualization of §4.
    """
    rms = E.pow(2).mean(dim=dim, keepdim=True).sqrt()
    return E / rms.clamp(min=1.0 / inflation)


def project_embedding(E: Tensor, w_max: float = 1.0, dim: int = -1) -> Tensor:
    """Pull every token vector back to RMS at most ``w_max`` (§6.2)."""
    return normalize_token_vectors(E / w_max, 1.0, dim) * w_max


# --------------------------------------------------------------------------------------------
# Projection of a stack of same-shape matrices with the SPEC's unit conventions and the guards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a projection needs to know about the matrices of a stack and the step that just happened.

    Per-matrix values are tuples with one entry per matrix of the stack.
    """

    w_max: tuple[float, ...]
    lr_t: tuple[float, ...]  # lr * target_norm of the step
    wd_eff: tuple[float, ...]  # wd * lr * target_norm of the step
    max_update_norm: tuple[float, ...]  # u of §6.1, in W / scale units
    step_bounded: tuple[bool, ...]  # whether u really bounds the step (Muon's) or is only assumed
    spectral_wd: float
    coupling: str
    power_iters: int
    power_state: Tensor | None  # (matrices, smaller side), updated in place
    guard: bool  # fall back to the exact cap where a polynomial's guarantee would fail
    form: str  # how the polynomial methods are evaluated (odd_polynomial_steps)
    shard: RowShard | None = None  # the stack is some rows of one split matrix


def _per_matrix(values, like: Tensor, trailing: int = 2) -> float | Tensor:
    """Per-matrix floats as something that broadcasts over a stack: a plain float when they are all
    equal (the usual case: no host-to-device copy, which on a GPU would wait for the queue), else a
    tensor of shape ``(matrices,) + (1,) * trailing``."""
    if len(set(values)) == 1:
        return float(values[0])
    tensor = torch.tensor(values, dtype=like.dtype)
    if like.is_cuda:
        tensor = tensor.pin_memory().to(like.device, non_blocking=True)
    return tensor.view(-1, *(1,) * trailing)


def _exact_cap_rows(M: Tensor, result: Tensor, rows: list[bool], caps: tuple[float, ...], shard: RowShard | None = None) -> Tensor:
    """``result`` with the chosen matrices of the stack replaced by their exact cap ``min(s, cap)``."""
    if not any(rows):
        return result
    mask = torch.tensor(rows, dtype=torch.bool, device=M.device)
    chosen = [cap for cap, row in zip(caps, rows) if row]
    result = result.clone()
    result[mask] = svd_cap(M[mask], torch.tensor(chosen, dtype=M.dtype, device=M.device).view(-1, 1), shard)
    return result


def _soft_cap_step(M: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
    """The soft cap, guarded. Its guarantee needs (1) the scalar map monotone on [0, k] and (2)
    every singular value at most k. A Muon step ensures (2) by construction; after any other step
    the largest singular value is computed exactly and a matrix beyond k takes the exact cap."""
    beyond = [False] * M.shape[0]
    if ctx.guard and not all(ctx.step_bounded):
        sigma = spectral_norms(M, ctx.shard).tolist()
        beyond = [not bounded and s > w * (1 - wd) + u
                  for s, bounded, w, wd, u in zip(sigma, ctx.step_bounded, ctx.w_max, ctx.wd_eff, ctx.max_update_norm)]
    alphas, fallback = [], []
    for w_max, wd_eff, u, far in zip(ctx.w_max, ctx.wd_eff, ctx.max_update_norm, beyond):
        k = w_max * (1 - wd_eff) + u
        if ctx.coupling == "exact" and k <= w_max and not far:
            # decay outweighs the step: nothing can leave the ball, and the coupling's fallback
            # alpha = 1 (no root) would inflate every singular value above 1
            alphas.append(0.0), fallback.append(False)
            continue
        alpha = soft_cap_coupling(w_max, wd_eff, u)
        unsafe = far or (ctx.guard and not soft_cap_is_monotone(alpha, k))
        alphas.append(0.0 if unsafe else alpha), fallback.append(unsafe)
    out = soft_cap(M, _per_matrix(alphas, M), ctx.form, ctx.shard) if any(alphas) else M
    # decided on the host from the step's floats: counting them never waits for the device
    return _exact_cap_rows(M, out, fallback, ctx.w_max, ctx.shard), torch.tensor(fallback, dtype=torch.bool)


def _hard_cap_step(M: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
    if not ctx.guard:
        return hard_cap(M, ctx.form, ctx.shard), torch.zeros(M.shape[0], dtype=torch.bool)
    # the one guard that reads the device every step: which branch to take depends on the weights
    fits = (sigma_upper_bound(M, ctx.shard) <= HARD_CAP_SAFE_SIGMA).cpu()  # False for inf and nan too
    if bool(fits.all()):
        return hard_cap(M, ctx.form, ctx.shard), ~fits
    out = torch.empty_like(M)
    out[~fits] = svd_cap(M[~fits], 1.0, ctx.shard)  # M is W / (scale * w_max) here: the cap is 1
    if bool(fits.any()):
        out[fits] = hard_cap(M[fits], ctx.form, ctx.shard)
    return out, ~fits


def _no_fallback(function: Callable[[Tensor, StepContext], Tensor]) -> Callable[[Tensor, StepContext], tuple[Tensor, Tensor]]:
    return lambda M, ctx: (function(M, ctx), torch.zeros(M.shape[0], dtype=torch.bool))


# name -> (function on a stack M, acts on W / (scale * w_max) rather than W / scale). Each returns
# the projected stack and, per matrix, whether a guard replaced the method by the exact cap.
LINEAR_METHODS: dict[str, tuple[Callable[[Tensor, StepContext], tuple[Tensor, Tensor]], bool]] = {
    "none": (_no_fallback(lambda M, ctx: M), False),
    "spectral_normalize": (_no_fallback(lambda M, ctx: spectral_normalize(M, ctx.power_iters, ctx.power_state, ctx.shard)), True),
    "spectral_soft_cap": (_soft_cap_step, False),
    "spectral_hard_cap": (_hard_cap_step, True),
    "spectral_hammer": (
        _no_fallback(lambda M, ctx: spectral_hammer(M, _per_matrix(ctx.w_max, M, trailing=0), ctx.power_iters, ctx.power_state, ctx.shard)),
        False,
    ),
    "spectral_weight_decay": (
        _no_fallback(lambda M, ctx: spectral_weight_decay(M, ctx.spectral_wd, ctx.power_iters, ctx.power_state, ctx.shard)),
        False,
    ),
    "orthogonalize": (_no_fallback(lambda M, ctx: orthogonalize(M, form=ctx.form, shard=ctx.shard)), True),
    "svd_cap": (_no_fallback(lambda M, ctx: svd_cap(M, _per_matrix(ctx.w_max, M, trailing=1), ctx.shard)), False),
}



def register_constraint(name: str, caps_at_one: bool = False):
    """Add a constraint method: the decorated function takes a stack of matrices ``M`` and the
    ``StepContext`` and returns the projected stack. ``M`` is ``W / scale`` (RMS->RMS units), or
    ``W / (scale * w_max)`` with ``caps_at_one`` (the method then caps at 1); the result is scaled
    back. With a yaml file in ``conf/constraint/`` naming it (``method: <name>``), that is all a new
    constraint needs (docs/constraints.md)."""

    def register(function: Callable[[Tensor, StepContext], Tensor]) -> Callable[[Tensor, StepContext], Tensor]:
        LINEAR_METHODS[name] = (_no_fallback(function), caps_at_one)
        return function

    return register


POWER_ITERATION_METHODS = frozenset({"spectral_normalize", "spectral_hammer", "spectral_weight_decay"})
POLYNOMIAL_METHODS = frozenset({"spectral_soft_cap", "spectral_hard_cap", "orthogonalize"})
PROJECTION_DTYPES = ("float32", "bfloat16")
GUARDED_METHODS = frozenset({"spectral_soft_cap", "spectral_hard_cap"})
COUPLINGS = ("exact", "reference")


def max_update_norm(lr_t: float, scale: float, coupling: str, update_sigma_max: float | None = None) -> float:
    """``u`` of §6.1: the largest spectral norm one optimizer step can have, in ``W / scale`` units.

    ``exact``: Muon's step is ``lr * t * orth(buf)`` in these units, and Newton-Schulz output has
    spectral norm at most ``update_sigma_max``, so this is a true bound.
    ``reference``: the paper's code, ``lr * t / scale``; it is not a bound when ``scale > 1``
    (``fanout > fanin``) and kept only for bit-parity.
    """
    if coupling == "exact":
        return lr_t * (ns_max_singular_value("small") if update_sigma_max is None else update_sigma_max)
    if coupling == "reference":
        return lr_t / scale
    raise ValueError(f"constraint.coupling must be one of {list(COUPLINGS)}, got {coupling!r}")


def _each(value, count: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


def project_stack(
    W: Tensor,
    method: str,
    *,
    w_max: tuple[float, ...],
    lr_t: tuple[float, ...],
    wd_eff: tuple[float, ...],
    spectral_wd: float = 0.0,
    coupling: str = "exact",
    update_sigma_max: float | tuple[float, ...] | None = None,
    power_iters: int = 16,
    power_state: Tensor | None = None,
    guard: bool = True,
    step_bounded: tuple[bool, ...] | None = None,
    form: str = "auto",
    dtype: torch.dtype | None = None,
    shard: RowShard | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply constraint ``method`` to a stack of same-shape weights ``(matrices, fanout, fanin)``.

    Returns the projected stack and a boolean per matrix: True where a guard (``guard=True``) found
    the method's guarantee void for this input (soft cap not monotone on [0, k], hard cap input
    beyond its polynomial's range) and applied the exact cap instead.

    ``update_sigma_max``: the optimizer's step bound (``projection.StepBound``), one for every matrix or
    one per matrix. ``dtype``: the working precision of the polynomial methods (soft cap, hard cap, orthogonalize);
    ``torch.bfloat16`` rounds every projected weight to bfloat16, as the paper's NanoGPT run does
    (what that rounding costs is measured, not bounded). ``shard``: ``W`` is some rows of one split matrix.
    """
    if method not in LINEAR_METHODS:
        raise ValueError(f"unknown constraint method {method!r}; allowed: {sorted(LINEAR_METHODS)}")
    if method == "none":
        return W, torch.zeros(W.shape[0], dtype=torch.bool)
    function, caps_at_one = LINEAR_METHODS[method]
    scale = layer_scale(W if shard is None else shard.shape)
    unit = _per_matrix(w_max, W) * scale if caps_at_one else scale
    ctx = StepContext(
        w_max=tuple(w_max),
        lr_t=tuple(lr_t),
        wd_eff=tuple(wd_eff),
        max_update_norm=tuple(max_update_norm(x, scale, coupling, sigma) for x, sigma in zip(lr_t, _each(update_sigma_max, len(lr_t)))),
        step_bounded=tuple(step_bounded) if step_bounded is not None else (True,) * len(lr_t),
        spectral_wd=spectral_wd,
        coupling=coupling,
        power_iters=power_iters,
        power_state=power_state,
        guard=guard,
        form=form,
        shard=shard,
    )
    M = W / unit
    if dtype is not None and method in POLYNOMIAL_METHODS:
        projected, fell_back = function(M.to(dtype), ctx)
        return projected.to(W.dtype) * unit, fell_back
    projected, fell_back = function(M, ctx)
    return projected * unit, fell_back


def project_linear(
    W: Tensor,
    method: str,
    *,
    w_max: float,
    lr_t: float,
    wd_eff: float = 0.0,
    spectral_wd: float = 0.0,
    coupling: str = "exact",
    update_sigma_max: float | None = None,
    power_iters: int = 16,
    power_state: Tensor | None = None,
    guard: bool = True,
    form: str = "auto",
) -> Tensor:
    """Apply constraint ``method`` to one layer's weight ``W`` of shape ``(fanout, fanin)`` (or a
    stack ``(..., fanout, fanin)`` sharing one ``w_max`` and step). ``guard=False`` reproduces the
    paper's code exactly, also where its guarantee fails (see ``project_stack``)."""
    stack = W.reshape(-1, *W.shape[-2:])
    count = stack.shape[0]
    projected, _ = project_stack(
        stack, method, w_max=(w_max,) * count, lr_t=(lr_t,) * count, wd_eff=(wd_eff,) * count,
        spectral_wd=spectral_wd, coupling=coupling, update_sigma_max=update_sigma_max, power_iters=power_iters,
        power_state=None if power_state is None else power_state.view(count, -1),  # a view: updated in place
        guard=guard, form=form,
    )
    return projected.reshape(W.shape)
