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


# --------------------------------------------------------------------------------------------
# A rigorous bound on what an odd polynomial map does to singular values
# --------------------------------------------------------------------------------------------
# Interval arithmetic in float64 with outward rounding: every IEEE operation is correctly
# rounded, so moving each computed end one float outward (nextafter) encloses the exact result.
# Written here rather than taken from mpmath.iv (pure Python, ~100x slower on the ~10^5 interval
# evaluations a bound takes); tests/test_polynomial_bounds.py checks the enclosures against mpmath.


def _down(x: np.ndarray) -> np.ndarray:
    return np.nextafter(x, -np.inf)


def _up(x: np.ndarray) -> np.ndarray:
    return np.nextafter(x, np.inf)


Interval = tuple[np.ndarray, np.ndarray]  # (lower ends, upper ends), one interval per entry


def _add(x: Interval, y: Interval) -> Interval:
    return _down(x[0] + y[0]), _up(x[1] + y[1])


def _sub(x: Interval, y: Interval) -> Interval:
    return _down(x[0] - y[1]), _up(x[1] - y[0])


def _mul(x: Interval, y: Interval) -> Interval:
    products = np.stack([x[0] * y[0], x[0] * y[1], x[1] * y[0], x[1] * y[1]])
    return _down(products.min(axis=0)), _up(products.max(axis=0))


def _times(k: float, x: Interval) -> Interval:
    return (_down(k * x[0]), _up(k * x[1])) if k >= 0 else (_down(k * x[1]), _up(k * x[0]))


def _square(x: Interval) -> Interval:
    low, high = x[0] * x[0], x[1] * x[1]
    least = np.where(x[0] >= 0, low, np.where(x[1] <= 0, high, 0.0))
    return _down(least).clip(min=0.0), _up(np.maximum(low, high))


def _constant(k: float, like: np.ndarray) -> Interval:
    """The interval one float either side of a rounded product ``k``: it holds the exact product."""
    k = np.full_like(like, k)
    return _down(k), _up(k)


def _odd_step(abc: tuple[float, float, float], s: Interval) -> Interval:
    """``a s + b s^3 + c s^5`` on intervals: the naive enclosure intersected with the centred
    form ``p(m) + p'(S) (S - m)``, which stays tight where the map is flat (at its maximum)."""
    a, b, c = abc
    s2 = _square(s)
    s3 = _mul(s2, s)
    naive = _add(_add(_times(a, s), _times(b, s3)), _times(c, _mul(s2, s3)))
    m = np.clip(0.5 * (s[0] + s[1]), s[0], s[1])
    m2 = _square((m, m))
    m3 = _mul(m2, (m, m))
    at_m = _add(_add(_times(a, (m, m)), _times(b, m3)), _times(c, _mul(m2, m3)))
    # the slope's coefficients 3b and 5c are products in float64 too: enclosed, not rounded to nearest
    slope = _add(_add((np.full_like(m, a), np.full_like(m, a)), _mul(_constant(3 * b, m), s2)), _mul(_constant(5 * c, m), _square(s2)))
    centred = _add(at_m, _mul(slope, _sub(s, (m, m))))
    return np.maximum(naive[0], centred[0]), np.minimum(naive[1], centred[1])


def enclose_odd_polynomials(coefficients, lower: np.ndarray, upper: np.ndarray) -> Interval:
    """Intervals that contain the composition of the odd steps ``(a, b, c)`` on each ``[lower, upper]``."""
    s: Interval = (np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
    for abc in coefficients:
        s = _odd_step(tuple(map(float, abc)), s)
    return s


def odd_polynomial_bound(coefficients, upper: float = 1.0, tolerance: float = 1e-12) -> float:
    """A proven upper bound on ``|p(s)|`` for ``s`` in ``[0, upper]``, ``p`` the composition of the odd
    steps ``s -> a s + b s^3 + c s^5``: the largest singular value the map can output for inputs of
    spectral norm at most ``upper`` (in exact arithmetic with these float64 coefficients).

    Branch and bound: ``[0, upper]`` in cells, each cell's values enclosed by interval arithmetic
    with outward rounding; cells whose enclosure lies below a value reached (a rigorous lower end
    at a cell's midpoint) are dropped, the rest bisected, until the largest upper end is within
    ``tolerance`` of a reached value. The bound is that largest upper end. ``-p`` is ``p`` with the
    last step negated, so the same search bounds the map's most negative value.
    """
    coefficients = tuple(tuple(map(float, abc)) for abc in coefficients)
    negated = coefficients[:-1] + (tuple(-x for x in coefficients[-1]),)
    return max(_largest_value(coefficients, upper, tolerance), _largest_value(negated, upper, tolerance))


def _largest_value(coefficients, upper: float, tolerance: float, cells: int = 4096, most_cells: int = 1 << 20) -> float:
    edges = np.linspace(0.0, upper, cells + 1)
    lower, higher = edges[:-1], edges[1:]
    reached = -np.inf
    while len(lower) <= most_cells:
        middle = 0.5 * (lower + higher)
        reached = max(reached, float(enclose_odd_polynomials(coefficients, middle, middle)[0].max()))
        top = enclose_odd_polynomials(coefficients, lower, higher)[1]
        alive = top >= reached
        lower, higher, middle, top = lower[alive], higher[alive], middle[alive], top[alive]
        if float(top.max()) - reached <= tolerance:
            return float(top.max())
        lower, higher = np.concatenate([lower, middle]), np.concatenate([middle, higher])
    raise ArithmeticError(f"the bound on the polynomial's maximum did not converge (gap {float(top.max()) - reached:.3g} "
                          f"with {len(lower)} cells left)")


@functools.lru_cache(maxsize=None)
def ns_max_singular_value(coefficients: str | tuple = "small") -> float:
    """The largest singular value Newton-Schulz can output for any input, proven.

    The input is Frobenius-normalised, so its singular values lie in [0, 1], and each step maps
    every singular value through its odd polynomial: the output's are at most
    ``odd_polynomial_bound(coefficients, 1)``. That is exact arithmetic; what rounding adds in
    float32 or bfloat16 is measured, not proven (``Muon.step_spectral_bound``'s margins).
    """
    return odd_polynomial_bound(_coefficients(coefficients), 1.0)


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


def sigma_upper_bound(M: Tensor, shard: RowShard | None = None, squarings: int = 2) -> Tensor:
    """A rigorous upper bound on ``sigma_max`` of each matrix that never waits for the device:
    ``||A^(2^s)||_F^(1/2^(s+1))`` for the small Gram matrix ``A`` (n x n) and ``s`` squarings, at
    most ``n^(1/2^(s+2))`` times ``sigma_max`` itself (``s = 2``: 1.5x for n = 768, cheap;
    ``s = 14``: 1.00013x for n = 3072). Each square is normalised by its Frobenius norm so that nothing overflows:
    ``lambda_max(A) <= prod_j c_j^(1/2^j)`` with ``c_j`` the norm divided out at square ``j``."""
    X = M.mT if _is_wide(M, shard) else M
    A = _gram_of(shard)(X.mT @ X)
    log_bound = torch.zeros(A.shape[:-2] + (1, 1), dtype=A.dtype, device=A.device)
    for j in range(squarings + 1):
        frobenius = torch.linalg.matrix_norm(A, keepdim=True).clamp(min=1e-300)
        log_bound = log_bound + frobenius.log() / 2**j
        if j < squarings:
            A = A / frobenius
            A = A @ A
    return (log_bound / 2).exp().squeeze(-1).squeeze(-1)


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
