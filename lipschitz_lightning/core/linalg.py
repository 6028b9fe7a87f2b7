"""Linear algebra under the constraints and Muon (SPEC §4, §6): Newton-Schulz (the odd polynomial
steps every polynomial method shares, in the direct or the Gram form), power iteration, exact and
upper-bounded spectral norms, the RMS->RMS scale, and ``RowShard`` for a matrix split by rows across
processes. Pure torch; every function batches over leading dimensions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

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



def layer_scale(W: Tensor | tuple[int, ...]) -> float:
    """``sqrt(fanout / fanin)``: the factor between ``W`` and the matrix whose spectral norm is ``||W||_rms``."""
    shape = W.shape if isinstance(W, Tensor) else W
    return math.sqrt(shape[-2] / shape[-1])
