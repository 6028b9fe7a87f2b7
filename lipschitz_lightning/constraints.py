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


def _is_wide(M: Tensor, shard: RowShard | None = None) -> bool:
    """Whether the polynomials work on ``M M^T`` (wide) or ``M^T M`` (tall): the smaller Gram side.
    Rows of a split matrix are a piece of a tall one, whatever the piece's own shape."""
    return shard is None and M.shape[-2] <= M.shape[-1]


@dataclass(frozen=True)
class RowShard:
    """This process holds some rows of a tall matrix whose other rows other processes hold (a
    50304 x 768 head split across 8 GPUs). Every method here needs only the small Gram matrix
    ``M^T M`` and row-by-row products, and the Gram matrix is a sum over rows: ``sum`` adds a
    process's part to the others' (an all-reduce), the rest stays row by row. ``shape`` is the whole
    matrix's (rows > columns). Every process of the split must make the same calls in the same order."""

    shape: tuple[int, int]
    sum: Callable[[Tensor], Tensor]

    def frobenius(self, X: Tensor) -> Tensor:
        """``||M||_F`` of the whole matrix from this piece, per matrix of a stack, keepdim."""
        return self.sum(X.float().pow(2).sum(dim=(-2, -1), keepdim=True)).sqrt().to(X.dtype)


POLYNOMIAL_FORMS = ("auto", "direct", "gram")
GRAM_RESTART = 3  # Gram-form steps between two explicit X (see odd_polynomial_steps)


def _uses_gram(X: Tensor, form: str, shard: RowShard | None = None) -> bool:
    """``auto``: the Gram form for float32/64 stacks at least twice as wide as tall, where it does
    fewer operations; bfloat16 keeps the direct form, whose rounding does not compound. A split
    matrix decides by its whole shape, so that every process of the split takes the same path."""
    if form not in POLYNOMIAL_FORMS:
        raise ValueError(f"polynomial form must be one of {list(POLYNOMIAL_FORMS)}, got {form!r}")
    if form != "auto":
        return form == "gram"
    small, large = (min(shard.shape), max(shard.shape)) if shard is not None else (X.shape[-2], X.shape[-1])
    return X.dtype in (torch.float32, torch.float64) and large >= 2 * small


def odd_polynomial_steps(X: Tensor, coefficients, form: str = "auto", shard: RowShard | None = None) -> Tensor:
    """``X <- (a I + b A + c A^2) X`` with ``A = X X^T``, for each ``(a, b, c)``; ``X`` wide (m <= n).

    Every singular value goes through ``s -> a s + b s^3 + c s^5``. Newton-Schulz, the hard cap and
    the soft cap are all this map. ``b`` may be a tensor of shape ``(matrices, 1, 1)``.

    ``direct``: each step forms ``A`` and multiplies back, 2 products of size m x m x n per step.
    ``gram``: within a run of steps, ``A`` and the accumulated factor ``Q`` (with ``X = Q X_start``)
    are polynomials in ``G = X_start X_start^T``, so they commute and ``A <- P A P``, ``Q <- P Q``
    stay m x m: one m x m x n product forms ``G``, one applies ``Q``, the steps in between cost
    m^3. ``Q`` amplifies small singular values (by ~a^k after k steps) and with them float32
    rounding, so ``X`` is formed again every ``GRAM_RESTART`` steps: 4 large products for the 6
    Newton-Schulz steps instead of 12, at the direct form's float32 error (tests check it on
    inputs whose singular values span 1e-6..1). The same polynomials, so every guarantee holds.
    With a ``shard``, ``X`` holds some columns (the split matrix's rows) and every ``A`` is summed.
    """
    gram = _gram_of(shard)
    if not _uses_gram(X, form, shard):
        for a, b, c in coefficients:
            A = gram(X @ X.mT)
            B = b * A + c * (A @ A) if _nonzero(c) else b * A
            X = a * X + B @ X
        return X
    coefficients = list(coefficients)
    for start in range(0, len(coefficients), GRAM_RESTART):
        steps = coefficients[start : start + GRAM_RESTART]
        A = gram(X @ X.mT)
        identity = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Q = None
        for index, (a, b, c) in enumerate(steps):
            P = a * identity + b * A + (c * (A @ A) if _nonzero(c) else 0)
            Q = P if Q is None else P @ Q
            if index + 1 < len(steps):  # the run's last A would not be used
                A = P @ (A @ P)
        X = Q @ X
    return X


def _gram_of(shard: RowShard | None) -> Callable[[Tensor], Tensor]:
    """Sum a piece's Gram matrix over the split (in float32 at least: bf16 partial sums would lose it)."""
    if shard is None:
        return lambda A: A
    return lambda A: shard.sum(A.float() if A.dtype in (torch.bfloat16, torch.float16) else A).to(A.dtype)


def _nonzero(c) -> bool:
    return isinstance(c, Tensor) or c != 0


def orthogonalize(M: Tensor, coefficients: str | tuple = "small", dtype: torch.dtype | None = None, form: str = "auto",
                  shard: RowShard | None = None) -> Tensor:
    """Newton-Schulz approximation of the polar factor ``U V^T`` of ``M``.

    ``dtype`` is the working precision; ``None`` keeps float32 (bfloat16 is what GPUs use).
    ``form``: see ``odd_polynomial_steps``. ``shard``: ``M`` is some rows of a split matrix.
    """
    out_dtype = M.dtype
    X = M.to(dtype or torch.float32)
    norm = torch.linalg.matrix_norm(X, keepdim=True) if shard is None else shard.frobenius(X)
    X = X / (norm + 1e-7)
    transpose = not _is_wide(X, shard)
    if transpose:
        X = X.mT
    X = odd_polynomial_steps(X, _coefficients(coefficients), form, shard)
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
    M: Tensor, iters: int = 16, state: Tensor | None = None, shard: RowShard | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, sigma, v)`` with ``M v ~ sigma u`` for the largest singular value, by power iteration.

    Iterates on the smaller Gram matrix from a seeded random start; ``iters`` counts powers of
    the Gram matrix (above 16 they are taken by repeated squaring, so ``iters`` is then rounded
    down to 16 times a power of two). ``state`` (a vector on the
    smaller side, e.g. from ``random_start_vector``) is used as the start instead and overwritten
    with the converged vector, so a caller that keeps it between optimizer steps warm-starts the
    next call (Miyato et al.'s persistent ``u``). ``sigma`` has shape ``M.shape[:-2]``. With a
    ``shard`` (``M`` some rows of a split matrix), ``u`` holds those rows of the whole ``u``.
    """
    wide = _is_wide(M, shard)
    A = M.mT if wide else M  # tall: the Gram side A^T A is the small one
    x = random_start_vector(M if shard is None else M.new_empty(shard.shape)) if state is None else state.to(M.dtype)
    gram = _gram_of(shard)(A.mT @ A)
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
    sigma = torch.linalg.vector_norm(Ax, dim=-1) if shard is None else shard.sum(Ax.pow(2).sum(dim=-1)).sqrt()
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


# The hard cap's polynomial stays within [0, 1.011] for singular values in [0, 4.05] and explodes
# above (p(5) ~ 6e126). Inputs whose top singular value may exceed this take the exact cap instead.
HARD_CAP_SAFE_SIGMA = 4.0


def sigma_upper_bound(M: Tensor, shard: RowShard | None = None) -> Tensor:
    """A cheap, rigorous upper bound on ``sigma_max`` of each matrix: ``||A^4||_F^(1/8)`` for the
    small Gram matrix ``A``, at most ``n^(1/8)`` (2.3 for n = 768) times ``sigma_max`` itself."""
    X = M.mT if _is_wide(M, shard) else M
    A = _gram_of(shard)(X.mT @ X)
    frobenius = torch.linalg.matrix_norm(A, keepdim=True).clamp(min=1e-30)
    B = A / frobenius  # normalised, so that the fourth power cannot overflow
    B = B @ B
    B = B @ B
    return (frobenius.sqrt() * torch.linalg.matrix_norm(B, keepdim=True).pow(1 / 8)).squeeze(-1).squeeze(-1)


def spectral_norms(M: Tensor, shard: RowShard | None = None) -> Tensor:
    """The exact largest singular value of each matrix of a stack, from its small Gram matrix's
    largest eigenvalue in float64."""
    X = M.double()
    gram = X @ X.mT if _is_wide(M, shard) else _gram_of(shard)(X.mT @ X)
    return torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0).sqrt()


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

POWER_ITERATION_METHODS = frozenset({"spectral_normalize", "spectral_hammer", "spectral_weight_decay"})
POLYNOMIAL_METHODS = frozenset({"spectral_soft_cap", "spectral_hard_cap", "orthogonalize"})
PROJECTION_DTYPES = ("float32", "bfloat16")
GUARDED_METHODS = frozenset({"spectral_soft_cap", "spectral_hard_cap"})
COUPLINGS = ("exact", "reference")


def layer_scale(W: Tensor | tuple[int, ...]) -> float:
    """``sqrt(fanout / fanin)``: the factor between ``W`` and the matrix whose spectral norm is ``||W||_rms``."""
    shape = W.shape if isinstance(W, Tensor) else W
    return math.sqrt(shape[-2] / shape[-1])


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
    coupling: str = "reference",
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
    (its guarantee then holds up to that rounding). ``shard``: ``W`` is some rows of one split matrix.
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
    coupling: str = "reference",
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
