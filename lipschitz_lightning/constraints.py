"""Weight constraints (SPEC §4, §6): projections that keep a weight matrix in a norm ball.

Pure torch, no Lightning. Every function takes and returns tensors and batches over leading
dimensions (a stack of matrices has shape ``(..., fanout, fanin)``).

Two layers of API:

- bare matrix functions (``orthogonalize``, ``soft_cap``, ``spectral_hammer`` ...) act on ``M``
  exactly as written in SPEC §6, with no ``scale`` or ``w_max`` rescaling;
- ``project_linear`` applies one method to a layer's weight ``W`` with the SPEC's unit
  conventions (act on ``W / scale``, or on ``W / (scale * w_max)`` for the methods that cap at 1).

Adding a constraint means one function in ``LINEAR_METHODS`` plus one yaml file in
``conf/constraint/``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Newton-Schulz polar approximation (SPEC §4)
# --------------------------------------------------------------------------------------------

NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "small": tuple(
        (a / 1024, b / 1024, c / 1024)
        for a, b, c in [
            (3955, -8306, 5008),
            (3735, -6681, 3463),
            (3799, -6499, 3211),
            (4019, -6385, 2906),
            (2677, -3029, 1162),
            (2172, -1833, 682),
        ]
    ),
    "nanogpt": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "keller": ((3.4445, -4.7750, 2.0315),) * 5,
}


def _coefficients(coefficients: str | tuple) -> tuple[tuple[float, float, float], ...]:
    if isinstance(coefficients, str):
        if coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"unknown Newton-Schulz coefficient set {coefficients!r}; "
                f"allowed: {sorted(NS_COEFFICIENTS)}"
            )
        return NS_COEFFICIENTS[coefficients]
    return tuple(tuple(map(float, abc)) for abc in coefficients)


def _is_wide(M: Tensor) -> bool:
    return M.shape[-2] <= M.shape[-1]


def orthogonalize(M: Tensor, coefficients: str | tuple = "small", dtype: torch.dtype | None = None) -> Tensor:
    """Newton-Schulz approximation of the polar factor ``U V^T`` of ``M``.

    ``dtype`` is the working precision; ``None`` keeps float32 (bfloat16 is what GPUs use).
    """
    out_dtype = M.dtype
    X = M.to(dtype or torch.float32)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
    transpose = not _is_wide(X)
    if transpose:
        X = X.mT
    for a, b, c in _coefficients(coefficients):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if transpose:
        X = X.mT
    return X.to(out_dtype)


@functools.lru_cache(maxsize=None)
def ns_max_singular_value(coefficients: str | tuple = "small") -> float:
    """The largest singular value Newton-Schulz can output for any input.

    The input is Frobenius-normalised, so its singular values lie in [0, 1]; each step maps a
    singular value through the odd polynomial ``a s + b s^3 + c s^5``. The supremum of the
    composition over [0, 1] is found on a dense grid refined around its maximum (float64).
    """
    coeffs = _coefficients(coefficients)

    def compose(s: np.ndarray) -> np.ndarray:
        for a, b, c in coeffs:
            s = a * s + b * s**3 + c * s**5
        return s

    grid = np.linspace(0.0, 1.0, 200_001)
    best = int(np.argmax(compose(grid)))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.linspace(lo, hi, 100_001)
    return float(compose(fine).max())


# --------------------------------------------------------------------------------------------
# Power iteration (top singular triplet)
# --------------------------------------------------------------------------------------------

POWER_ITERATION_SEED = 0


def random_start_vector(M: Tensor, seed: int = POWER_ITERATION_SEED) -> Tensor:
    """A seeded start vector on the smaller Gram side, identical on every DDP rank."""
    n = min(M.shape[-2], M.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(*M.shape[:-2], n, generator=generator, dtype=torch.float32)
    return v.to(device=M.device, dtype=M.dtype)


def top_singular_triplet(
    M: Tensor, iters: int = 16, state: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, sigma, v)`` with ``M v ~ sigma u`` for the largest singular value, by power iteration.

    Iterates on the smaller Gram matrix from a seeded random start; ``iters`` counts powers of
    the Gram matrix (above 16 they are taken by repeated squaring, so ``iters`` is then rounded
    down to 16 times a power of two). ``state`` (a vector on the
    smaller side, e.g. from ``random_start_vector``) is used as the start instead and overwritten
    with the converged vector, so a caller that keeps it between optimizer steps warm-starts the
    next call (Miyato et al.'s persistent ``u``). ``sigma`` has shape ``M.shape[:-2]``.
    """
    wide = _is_wide(M)
    A = M.mT if wide else M  # tall: the Gram side A^T A is the small one
    x = random_start_vector(M) if state is None else state.to(M.dtype)
    gram = A.mT @ A
    # Past 16 iterations, square the Gram matrix instead: 16 products with G^(2^s) are 16 * 2^s
    # power steps for s matrix products, not a long chain of tiny kernels (slow on GPUs).
    squarings = max(0, int(math.log2(iters)) - 4) if iters > 0 else 0
    for _ in range(squarings):
        gram = gram @ gram
        gram = gram / torch.linalg.matrix_norm(gram, keepdim=True).clamp(min=1e-30)
    for _ in range(iters >> squarings):
        x = (gram @ x.unsqueeze(-1)).squeeze(-1)
        x = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-30)
    if state is not None:
        # a zero matrix (a zero-initialised layer) gives a zero iterate: keep the old start then,
        # or every later warm start would be stuck at zero
        alive = torch.linalg.vector_norm(x, dim=-1, keepdim=True) > 0
        state.copy_(torch.where(alive, x, state))
    Ax = (A @ x.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(Ax, dim=-1)
    y = Ax / (sigma.unsqueeze(-1) + 1e-30)
    # A = M^T when wide, so the roles of u and v swap back here
    u, v = (x, y) if wide else (y, x)
    return u, sigma, v


def _rank_one(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


# --------------------------------------------------------------------------------------------
# Bare matrix functions (SPEC §6 table; no scale, no w_max rescaling)
# --------------------------------------------------------------------------------------------

HARD_CAP_COEFFICIENTS = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)


def hard_cap(M: Tensor) -> Tensor:
    """Polynomial approximation of ``min(1, sigma)`` on every singular value."""
    transpose = _is_wide(M) and M.shape[-2] != M.shape[-1]
    X = M.mT if transpose else M  # tall, so that A = X^T X is the small Gram matrix
    for a, b, c in HARD_CAP_COEFFICIENTS:
        A = X.mT @ X
        X = a * X + X @ (b * A + c * A @ A)
    return X.mT if transpose else X


def _cube(M: Tensor) -> Tensor:
    """``M M^T M`` through the smaller Gram matrix."""
    return (M @ M.mT) @ M if _is_wide(M) else M @ (M.mT @ M)


def soft_cap(M: Tensor, alpha: float | Tensor) -> Tensor:
    """Two polynomial steps that pull large singular values down: ``s - a s^3`` then ``s + a s^3``."""
    M = M - alpha * _cube(M)
    return M + alpha * _cube(M)


def svd_cap(M: Tensor, w_max: float) -> Tensor:
    """Exact ``U diag(min(s, w_max)) V^T``: slow, the ground truth."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * S.clamp(max=w_max).unsqueeze(-2)) @ Vh


def spectral_normalize(M: Tensor, iters: int = 16, state: Tensor | None = None) -> Tensor:
    """``M / max(1, sigma_max)`` with ``sigma_max`` from power iteration (Miyato et al. 2018)."""
    _, sigma, _ = top_singular_triplet(M, iters, state)
    return M / sigma.clamp(min=1.0)[..., None, None]


def spectral_hammer(M: Tensor, w_max: float, iters: int = 16, state: Tensor | None = None) -> Tensor:
    """Set the largest singular value to exactly ``w_max``; the others are left alone."""
    u, sigma, v = top_singular_triplet(M, iters, state)
    return M + (w_max - sigma)[..., None, None] * _rank_one(u, v)


def spectral_weight_decay(M: Tensor, strength: float, iters: int = 16, state: Tensor | None = None) -> Tensor:
    """Decay only the top singular value: ``M - strength * sigma u v^T``."""
    u, sigma, v = top_singular_triplet(M, iters, state)
    return M - (strength * sigma)[..., None, None] * _rank_one(u, v)


def soft_cap_coupling(w_max: float, wd: float, max_update_norm: float) -> float:
    """The soft cap strength ``alpha`` that maps a singular value ``k`` exactly to ``w_max`` (§6.1).

    ``k = w_max (1 - wd) + max_update_norm`` is the largest singular value a weight at most
    ``w_max`` can reach after the decay and one step; ``alpha`` is the smallest real non-negative
    root of ``-k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 + (k - w_max)``, or 1 when there is none.
    """
    k = w_max * (1.0 - wd) + max_update_norm
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - w_max])
    real = roots.real[(np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))) & (roots.real >= 0)]
    return float(real.min()) if real.size else 1.0


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
# Per-layer projection with the SPEC's unit conventions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a projection may need to know about the layer and the step that just happened."""

    w_max: float
    lr_t: float  # lr * target_norm of the step
    wd_eff: float  # wd * lr * target_norm of the step
    spectral_wd: float
    scale: float  # sqrt(fanout / fanin)
    coupling: str
    max_update_norm: float  # u of §6.1, in W / scale units
    power_iters: int
    power_state: Tensor | None


def _soft_cap_step(M: Tensor, ctx: StepContext) -> Tensor:
    if ctx.coupling == "exact" and ctx.w_max * (1 - ctx.wd_eff) + ctx.max_update_norm <= ctx.w_max:
        # decay outweighs the step: nothing can leave the ball, and the coupling's fallback
        # alpha = 1 (no root) would inflate every singular value above 1
        return M
    alpha = soft_cap_coupling(ctx.w_max, ctx.wd_eff, ctx.max_update_norm)
    return soft_cap(M, alpha)


# name -> (function on M, acts on W / (scale * w_max) rather than W / scale)
LINEAR_METHODS: dict[str, tuple[Callable[[Tensor, StepContext], Tensor], bool]] = {
    "none": (lambda M, ctx: M, False),
    "spectral_normalize": (lambda M, ctx: spectral_normalize(M, ctx.power_iters, ctx.power_state), True),
    "spectral_soft_cap": (_soft_cap_step, False),
    "spectral_hard_cap": (lambda M, ctx: hard_cap(M), True),
    "spectral_hammer": (lambda M, ctx: spectral_hammer(M, ctx.w_max, ctx.power_iters, ctx.power_state), False),
    "spectral_weight_decay": (
        lambda M, ctx: spectral_weight_decay(M, ctx.spectral_wd, ctx.power_iters, ctx.power_state),
        False,
    ),
    "orthogonalize": (lambda M, ctx: orthogonalize(M), True),
    "svd_cap": (lambda M, ctx: svd_cap(M, ctx.w_max), False),
}

POWER_ITERATION_METHODS = frozenset({"spectral_normalize", "spectral_hammer", "spectral_weight_decay"})
COUPLINGS = ("exact", "reference")


def layer_scale(W: Tensor) -> float:
    """``sqrt(fanout / fanin)``: the factor between ``W`` and the matrix whose spectral norm is ``||W||_rms``."""
    return math.sqrt(W.shape[-2] / W.shape[-1])


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


def project_linear(
    W: Tensor,
    method: str,
    *,
    w_max: float,
    lr_t: float,
    wd_eff: float = 0.0,
    spectral_wd: float = 0.0,
    coupling: str = "reference",
    update_sigma_max: float | None = None,
    power_iters: int = 16,
    power_state: Tensor | None = None,
) -> Tensor:
    """Apply constraint ``method`` to a linear layer's weight ``W`` of shape ``(..., fanout, fanin)``."""
    if method not in LINEAR_METHODS:
        raise ValueError(f"unknown constraint method {method!r}; allowed: {sorted(LINEAR_METHODS)}")
    if method == "none":
        return W
    function, caps_at_one = LINEAR_METHODS[method]
    scale = layer_scale(W)
    unit = scale * w_max if caps_at_one else scale
    ctx = StepContext(
        w_max=w_max,
        lr_t=lr_t,
        wd_eff=wd_eff,
        spectral_wd=spectral_wd,
        scale=scale,
        coupling=coupling,
        max_update_norm=max_update_norm(lr_t, scale, coupling, update_sigma_max),
        power_iters=power_iters,
        power_state=power_state,
    )
    return function(W / unit, ctx) * unit
