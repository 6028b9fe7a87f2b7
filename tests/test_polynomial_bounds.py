"""The proven bounds on what a polynomial map does to singular values (core/linalg.py): the
largest singular value Newton-Schulz can output (the soft cap's coupling and orthogonalize rely on
it) and the hard cap's range. They come from interval arithmetic with outward rounding; these tests
check the enclosures against mpmath at 50 digits and the bounds against dense grids in float64."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from lipschitz_lightning.core.constraints import HARD_CAP_COEFFICIENTS, HARD_CAP_SAFE_SIGMA, hard_cap_bound
from lipschitz_lightning.core.linalg import (
    NS_COEFFICIENTS,
    enclose_odd_polynomials,
    ns_max_singular_value,
    odd_polynomial_bound,
)

CASES = {**{name: (coefficients, 1.0) for name, coefficients in NS_COEFFICIENTS.items()},
         "hard_cap": (HARD_CAP_COEFFICIENTS, HARD_CAP_SAFE_SIGMA)}


def compose(s: np.ndarray, coefficients) -> np.ndarray:
    for a, b, c in coefficients:
        s = a * s + b * s**3 + c * s**5
    return s


def exact(s: float, coefficients) -> mpmath.mpf:
    """The composition at the float ``s``, with the float64 coefficients, in 50 digits."""
    with mpmath.workdps(50):
        x = mpmath.mpf(s)
        for a, b, c in coefficients:
            x = mpmath.mpf(a) * x + mpmath.mpf(b) * x**3 + mpmath.mpf(c) * x**5
        return x


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_enclosures_contain_the_exact_values(name):
    coefficients, upper = CASES[name]
    generator = np.random.default_rng(0)
    lower = np.sort(generator.uniform(0, upper, 64))
    width = generator.uniform(0, 1e-3, 64)
    points = np.concatenate([lower, lower + width * generator.uniform(0, 1, 64), [0.0, upper]])
    cells_low, cells_high = np.concatenate([lower, lower, [0.0, upper]]), np.concatenate([lower, lower + width, [0.0, upper]])
    # each point lies in its cell: points[:64] in the degenerate cells, points[64:128] in the wide ones
    low, high = enclose_odd_polynomials(coefficients, cells_low, cells_high)
    for s, lo, hi in zip(points, low, high):
        value = exact(float(s), coefficients)
        assert mpmath.mpf(float(lo)) <= value <= mpmath.mpf(float(hi)), (name, s)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_bound_is_reached_to_within_1e_9_and_never_exceeded_on_a_dense_grid(name):
    coefficients, upper = CASES[name]
    grid = np.linspace(0.0, upper, 4_000_001)
    values = np.abs(compose(grid, coefficients))
    best = int(np.argmax(values))
    around = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 100_001)
    reached = max(float(values.max()), float(np.abs(compose(around, coefficients)).max()))
    bound = odd_polynomial_bound(coefficients, upper)
    print(f"\n{name}: proven {bound!r}, reached {reached!r}")
    assert reached <= bound <= reached + 1e-9


def test_newton_schulz_and_the_hard_cap_use_the_proven_bounds():
    assert ns_max_singular_value("small") == odd_polynomial_bound(NS_COEFFICIENTS["small"], 1.0)
    assert 0.99933 < ns_max_singular_value("small") < 0.99934  # below 1: u = lr t * it bounds Muon's step
    assert ns_max_singular_value("nanogpt") == pytest.approx(1.14502, abs=5e-6)  # SPEC §4's 1.14502
    assert 1.0108 < hard_cap_bound() < 1.0109
    # the hard cap's polynomial dips to about -hard_cap_bound() near 4: the bound is on |p|, not on p
    grid = np.linspace(0, HARD_CAP_SAFE_SIGMA, 400_001)
    assert compose(grid, HARD_CAP_COEFFICIENTS).min() < -1.01


def test_a_bound_that_cannot_converge_says_so():
    with pytest.raises(ArithmeticError, match="did not converge"):
        odd_polynomial_bound(NS_COEFFICIENTS["small"], 1.0, tolerance=0.0)
