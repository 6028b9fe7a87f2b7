"""Certified margins and radii: what a Lipschitz bound guarantees about a classifier's decisions.

Classifiers (the CIFAR-10 MLP: 3072 flattened pixels in [0, 1] -> 10 logits)
--------------------------------------------------------------------------------
The certified bound ``L`` is in RMS->RMS units (SPEC §2), ``rms(v) = ||v||_2 / sqrt(len v)``:
``rms(f(x) - f(y)) <= L rms(x - y)``. Writing the RMS norms out,

    ||f(x) - f(y)|| / sqrt(10) <= L ||x - y|| / sqrt(3072)   so   ||f(x) - f(y)|| <= L sqrt(10 / 3072) ||x - y||,

that is ``L_l2 = L_rms * sqrt(outputs / inputs) = L_rms * sqrt(10 / 3072)`` in plain l2 pixel units
(``l2_bound``). A logit difference ``f_i - f_j = (e_i - e_j) . f`` then moves by at most
``||e_i - e_j|| ||f(x) - f(y)|| = sqrt(2) L_l2 ||x - y||``, so a correctly classified point whose
margin (true logit minus the largest other) exceeds ``sqrt(2) L_l2 eps`` keeps its class for every
input within l2 distance ``eps``: it is **certified** at radius ``eps`` (``certified``); its
certified radius is ``margin / (sqrt(2) L_l2)`` (``certified_radius``).

- **Empirical robustness**: what a PGD l2 attack (``pgd_l2``) leaves correctly classified. Every
  certified point must survive it. A certified point the attack breaks, confirmed in float64
  (``lipschitz_violation``), refutes the bound: the command fails, naming checkpoint, radius, point.
- **Lower bound** on the Lipschitz constant (RMS units): the largest RMS->RMS norm of the network's
  Jacobian at validation points (``jacobian_norms``: the constant is the supremum of that norm),
  and a gradient ascent over input pairs on ``rms(f(a) - f(b)) / rms(a - b)`` started from the
  points and directions with the largest Jacobian norms (``pair_search``), both evaluated in
  float64. A lower bound above the certified one is again a refutation, and fails the command.
- **Low-precision weights**: accuracy with the weights rounded to bfloat16, and to float8 e4m3 with a
  per-tensor amax scale (``with_weights_cast``), computed in float32, next to float32 itself.
"""

from __future__ import annotations

import math

from torch import Tensor

from lipschitz_lightning.core.losses import margins  # noqa: F401  (the margin the checks below take; attacks use it too)

# Relative slack for comparing a value found in float64 with a bound computed from float64 norms:
# far above the rounding of either, far below anything a wrong bound would show.
SLACK = 1e-6


def l2_bound(rms_bound: float, inputs: int, outputs: int) -> float:
    """The Lipschitz bound in plain l2 units, ``||f(x) - f(y)|| <= L_l2 ||x - y||``, from the one in
    RMS units: ``L_l2 = L_rms * sqrt(outputs / inputs)`` (``sqrt(10 / 3072)`` for CIFAR-10; see the
    module's docstring for the two lines of algebra)."""
    return rms_bound * math.sqrt(outputs / inputs)


def certified_radius(margin: Tensor, bound_l2: float) -> Tensor:
    """The l2 radius within which no input can change the class: ``margin / (sqrt(2) L_l2)``, 0 for
    a misclassified point."""
    return margin.clamp(min=0) / (math.sqrt(2) * bound_l2)


def certified(margin: Tensor, bound_l2: float, eps: float) -> Tensor:
    """Points that no input within l2 distance ``eps`` can misclassify: ``margin > sqrt(2) L_l2 eps``."""
    return margin > math.sqrt(2) * bound_l2 * eps
