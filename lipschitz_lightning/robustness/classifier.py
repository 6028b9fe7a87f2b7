"""Certified against attacked accuracy of any classifier with a bound, in a few lines: what the
``certify`` command reports for a checkpoint of this project, for a network of the user's own (a
``models.protocol.LipschitzNetwork``, or a plain ``nn.Sequential`` read by ``PlainNetwork``). Pure torch.

    report = certify_classifier(model.net, x, y, radius=36 / 255)
    report.certified, report.attacked, report.clean
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipschitz_lightning.models.protocol import lipschitz_network
from lipschitz_lightning.robustness.attacks import lipschitz_violation, pgd_l2
from lipschitz_lightning.robustness.certified import certified, margins


class CertificateRefuted(AssertionError):
    """A certified point that an attack broke, confirmed in float64: the bound is wrong (a bug)."""


@dataclass(frozen=True)
class ClassifierCertificate:
    radius: float  # l2, in the input's units (pixels in [0, 1])
    bound_l2: float  # the Lipschitz bound of the logits in l2 units
    clean: float  # accuracy
    certified: float  # fraction of points no input within ``radius`` can misclassify
    attacked: float  # fraction that PGD at ``radius`` leaves correctly classified (at least ``certified``)


@torch.no_grad()
def _frozen(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    net = copy.deepcopy(net).to(dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def certify_classifier(net: nn.Module, x: Tensor, y: Tensor, radius: float, *, pgd_steps: int = 20, restarts: int = 1,
                       seed: int = 0) -> ClassifierCertificate:
    """Clean, certified and PGD-attacked accuracy of ``net`` on ``(x, y)`` at l2 ``radius``.

    The margins are the float64 network's and the bound the exact norms' (``logit_l2_bound``); a point
    is certified when its margin exceeds ``sqrt(2) L_l2 radius`` (``robustness.certified``). PGD attacks
    the float32 network; a certified point it breaks is re-checked in float64 and, if the drop is
    real, raises ``CertificateRefuted``."""
    bound_l2 = float(lipschitz_network(net).logit_l2_bound(radius))
    net32, net64 = _frozen(net, torch.float32), _frozen(net, torch.float64)
    with torch.no_grad():
        margin = margins(net64(x.double()), y)
    safe = certified(margin, bound_l2, radius)
    broken, delta = pgd_l2(net32, x.float(), y, radius, steps=pgd_steps, restarts=restarts,
                           generator=torch.Generator().manual_seed(seed))
    for i in (safe & broken).nonzero()[:, 0].tolist():
        violation = lipschitz_violation(net64, x[i], delta[i], y[i], bound_l2)
        if violation is not None:
            raise CertificateRefuted(f"point {i}, certified at l2 radius {radius:.6g}, was broken: {violation}")
    correct = margin > 0
    survived = correct & (~broken | safe)  # a certified point "broken" in float32 only was a rounding artefact
    return ClassifierCertificate(radius, bound_l2, float(correct.double().mean()), float(safe.double().mean()),
                                 float(survived.double().mean()))
