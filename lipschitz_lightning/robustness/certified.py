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

import torch
from torch import Tensor

from lipschitz_lightning.core.losses import margins  # noqa: F401  (the margin the checks below take; attacks use it too)
from lipschitz_lightning.models.protocol import PairwiseCertificate, lipschitz_network

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


# ----------------------------------------------------------------------------- per pair of classes


class PairCertificate:
    """What a classifier's bound certifies, pair of classes by pair: ``pairs[y, j]`` bounds how far the
    logit difference ``f_y - f_j`` moves per unit l2 of the input. A point of class ``y`` keeps it for
    every input within ``eps`` when ``f_y - f_j > pairs[y, j] eps`` for every ``j != y``.

    From the global bound every pair gets ``sqrt(2) L_l2`` (``global_bound``: the check above is then
    ``certified``'s); a network with a head of known rows gives ``|c| ||W_y - W_j|| L_below``
    (``models.protocol.PairwiseCertificate``), never more (docs/certified_training.md)."""

    def __init__(self, pairs: Tensor, kind: str):
        self.pairs = pairs.detach().double()  # where it was computed: a validation step checks on its device
        self.kind = kind  # "per pair of classes" or "global"

    @classmethod
    def global_bound(cls, bound_l2: float, classes: int) -> PairCertificate:
        return cls(math.sqrt(2) * bound_l2 * (1 - torch.eye(classes, dtype=torch.float64)), "global")

    @classmethod
    def of(cls, net, classes: int, radius: float) -> PairCertificate:
        """``net``'s per-pair bound where it has one, else its global ``logit_l2_bound``, for a claim at
        l2 ``radius``: a network whose bound holds on a domain (the ViT's) gives the one of the domain
        that radius fills; the MLP's holds everywhere and is the same at every radius."""
        net = lipschitz_network(net)
        if isinstance(net, PairwiseCertificate):
            return cls(net.pairwise_l2_bound(radius), "per pair of classes")
        return cls.global_bound(float(net.logit_l2_bound(radius)), classes)

    @staticmethod
    def differences(logits: Tensor, labels: Tensor) -> Tensor:
        """``f_y - f_j`` for every class ``j`` (``inf`` at ``j = y``), in float64."""
        logits = logits.double()
        differences = logits.gather(1, labels[:, None]) - logits
        return differences.scatter(1, labels[:, None], math.inf)

    def certified(self, logits: Tensor, labels: Tensor, eps: float) -> Tensor:
        """Points no input within l2 distance ``eps`` can move to another class."""
        pairs = self.pairs.to(logits.device)
        return (self.differences(logits, labels) > pairs[labels] * eps).all(dim=1)

    def radii(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each point's certified l2 radius, ``min_j (f_y - f_j) / pairs[y, j]`` (0 when misclassified)."""
        differences = self.differences(logits, labels)
        ratio = torch.where(differences > 0, differences / self.pairs.to(logits.device)[labels], torch.zeros_like(differences))
        return torch.where((differences > 0).all(dim=1), ratio.amin(dim=1), torch.zeros_like(ratio[:, 0]))

    def violation(self, net64, x: Tensor, delta: Tensor, label: Tensor) -> dict | None:
        """Whether ``x`` and ``x + delta`` contradict the bound (float64): some ``f_y - f_j`` fell by more
        than ``pairs[y, j] ||delta||``. The numbers of the worst pair when it did, else None (a float32
        artefact of the attack)."""
        return drop_violation(net64, x, delta, label, lambda distance: self.pairs[int(label)] * distance)


def drop_violation(net64, x: Tensor, delta: Tensor, label: Tensor, allowed_at) -> dict | None:
    """Whether some ``f_y - f_j`` fell from ``x`` to ``x + delta`` (float64) by more than
    ``allowed_at(||delta||)[j]``: the numbers of the worst pair when it did, else None."""
    x64, d64 = x.double()[None], delta.double()[None]
    with torch.no_grad():
        before, after = (PairCertificate.differences(net64(point), label.view(1))[0] for point in (x64, x64 + d64))
    distance = float(d64.norm())
    allowed = allowed_at(distance).to(before.device)
    excess = torch.where(torch.isfinite(before), (before - after) - allowed * (1 + SLACK), torch.full_like(before, -math.inf))
    j = int(excess.argmax())
    if excess[j] > 0:
        return {"margin_before": float(before[j]), "margin_after": float(after[j]), "l2_distance": distance,
                "allowed_drop": float(allowed[j]), "against_class": j}
    return None


# ----------------------------------------------------------------------------- around each input


class LocalAtRadius:
    """A network's local certificate at one radius on a set of inputs: ``drops[i, y, j]`` bounds how far
    ``f_y - f_j`` can fall within l2 ``radius`` of input ``i`` (``local_pairwise_drop``, docs/certificate.md §9),
    beside ``global_drops[y, j]``, what the network's pair bound allows every input."""

    def __init__(self, logits: Tensor, drops: Tensor, global_drops: Tensor):
        self.logits, self.drops, self.global_drops = logits, drops, global_drops

    def certified(self, labels: Tensor) -> Tensor:
        rows = torch.arange(len(labels), device=labels.device)
        return (PairCertificate.differences(self.logits, labels) > self.drops[rows, labels]).all(dim=1)

    def tightness(self) -> dict[str, float]:
        """How many times smaller each input's largest drop is than the global one of its class (the
        logits' argmax: the class a certificate speaks for): median and smallest over the inputs."""
        rows, predicted = torch.arange(len(self.logits)), self.logits.argmax(dim=1)
        ratio = self.global_drops[predicted].amax(dim=1) / self.drops[rows, predicted].amax(dim=1)
        return {"median": float(ratio.median()), "min": float(ratio.min())}

    def violation(self, net64, x: Tensor, delta: Tensor, labels: Tensor, index: int) -> dict | None:
        """Whether ``x[index] + delta`` contradicts the drops of input ``index`` (float64), as
        ``PairCertificate.violation`` does for the global one (the drops hold for every ``delta`` of the ball)."""
        violation = drop_violation(net64, x[index], delta, labels[index], lambda distance: self.drops[index, int(labels[index])])
        return violation | {"certificate": "local"} if violation is not None else None


class LocalCertificate:
    """The local certificate of a network that has one (``local_pairwise_drop(x, radius)``: the ViT's) on
    the inputs ``x``, taken ``batch`` at a time."""

    def __init__(self, net64, x: Tensor, batch: int):
        self.net64, self.x, self.batch = net64, x, batch
        self._at: dict[float, LocalAtRadius] = {}  # certify asks twice at its first radius (PGD, AutoAttack)

    @classmethod
    def of(cls, net64, x: Tensor, batch: int) -> LocalCertificate | None:
        return cls(net64, x, batch) if hasattr(net64, "local_pairwise_drop") else None

    def at(self, radius: float) -> LocalAtRadius:
        """Both bounds hold: each pair's drop is the smaller (the global one where attention could
        swing far, a large radius)."""
        if radius not in self._at:
            logits, drops = zip(*(self.net64.local_pairwise_drop(part, radius) for part in self.x.split(self.batch)))
            global_drops = self.net64.pairwise_l2_bound(radius) * radius
            self._at[radius] = LocalAtRadius(torch.cat(logits), torch.minimum(torch.cat(drops), global_drops[None]), global_drops)
        return self._at[radius]
