"""The Gram form of the polynomial methods (Newton-Schulz, soft cap, hard cap) against the direct
form: the same polynomials, so the same outputs up to float32 rounding, which is measured here."""

from __future__ import annotations

import pytest
import torch

from lipschitz_lightning.core import constraints as C
from lipschitz_lightning.core import linalg

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def spread_spectrum(shape, low: float, seed: int) -> torch.Tensor:
    """A float32 stack with singular values log-uniform in [low, 1]."""
    generator = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, r, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, r, generator=generator, dtype=torch.float64))
    s = low ** torch.rand(*batch, r, generator=generator, dtype=torch.float64)
    return ((U * s.unsqueeze(-2)) @ V.mT).float()


SHAPES = [(4, 32, 96), (4, 96, 32), (2, 64, 512)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("low", [1e-1, 1e-6])
@pytest.mark.parametrize("coefficients", ["small", "nanogpt"])
def test_newton_schulz_gram_form_matches_the_direct_form(shape, low, coefficients):
    M = spread_spectrum(shape, low, seed=1)
    exact = linalg.orthogonalize(M.double(), coefficients, torch.float64, form="direct")
    direct = linalg.orthogonalize(M, coefficients, form="direct")
    gram = linalg.orthogonalize(M, coefficients, form="gram")
    direct_error = float((direct.double() - exact).abs().max())
    gram_error = float((gram.double() - exact).abs().max())
    print(f"\n{shape} {coefficients} s >= {low:g}: float32 error direct {direct_error:.1e}, gram {gram_error:.1e}")
    assert gram_error <= max(10 * direct_error, 1e-5)
    bound = linalg.ns_max_singular_value(coefficients)
    assert float(torch.linalg.svdvals(gram.double()).max()) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_soft_and_hard_cap_gram_forms_match_the_direct_forms(shape):
    M = 1.5 * spread_spectrum(shape, 1e-3, seed=2)
    alpha = torch.tensor([0.05, 0.1, 0.2, 0.3][: shape[0]]).view(-1, 1, 1)
    torch.testing.assert_close(C.soft_cap(M, alpha, form="gram"), C.soft_cap(M, alpha, form="direct"), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(C.hard_cap(M, form="gram"), C.hard_cap(M, form="direct"), atol=2e-5, rtol=1e-4)


def test_auto_takes_the_gram_form_only_where_it_saves_work_in_float32():
    wide, square = torch.zeros(4, 40), torch.zeros(16, 16)
    assert linalg._uses_gram(wide, "auto") and not linalg._uses_gram(square, "auto")
    assert not linalg._uses_gram(wide.bfloat16(), "auto")  # 16-bit rounding would compound through Q
    assert linalg._uses_gram(square, "gram") and not linalg._uses_gram(wide, "direct")
    with pytest.raises(ValueError, match="gram"):
        linalg._uses_gram(wide, "fast")
