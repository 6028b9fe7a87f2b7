"""Certified against attacked accuracy of a classifier with a bound. Pure torch.

In a few lines, for any network (a ``models.protocol.LipschitzNetwork``, or a plain ``nn.Sequential``
read by ``PlainNetwork``)::

    report = certify_classifier(model.net, x, y, radius=36 / 255)
    report.certified, report.attacked, report.clean

In full, what the ``certify`` command reports for a checkpoint of this project (``classifier_report``):
certified and PGD accuracy radius by radius, AutoAttack beside PGD, a lower bound on the Lipschitz
constant from Jacobians and a pair search, and the weights rounded to bfloat16 and float8. A certified
point that an attack breaks (confirmed in float64), or a lower bound above the certified one, raises
``errors.CertificateBroken``: the bound is wrong, a bug.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipschitz_lightning.errors import CertificateBroken
from lipschitz_lightning.models.protocol import lipschitz_network
from lipschitz_lightning.robustness.attacks import (
    autoattack_l2,
    jacobian_norms,
    pair_search,
    pgd_l2,
)
from lipschitz_lightning.robustness.certified import (
    SLACK,
    LocalAtRadius,
    LocalCertificate,
    PairCertificate,
    l2_bound,
    margins,
)
from lipschitz_lightning.robustness.precision import frozen, weights_in_low_precision


# inputs per pass of the local certificate (a ViT of 16 patches: ~50 MB of float64 per 1000)
LOCAL_BATCH = 1000


@dataclass(frozen=True)
class ClassifierCertificate:
    radius: float  # l2, in the input's units (pixels in [0, 1])
    bound_l2: float  # the Lipschitz bound of the logits in l2 units
    clean: float  # accuracy
    certified: float  # fraction of points no input within ``radius`` can misclassify
    attacked: float  # fraction that PGD at ``radius`` leaves correctly classified (at least ``certified``)


def certify_classifier(net: nn.Module, x: Tensor, y: Tensor, radius: float, *, pgd_steps: int = 20, restarts: int = 1,
                       seed: int = 0) -> ClassifierCertificate:
    """Clean, certified and PGD-attacked accuracy of ``net`` on ``(x, y)`` at l2 ``radius``.

    The logits are the float64 network's and the bound the exact norms': per pair of classes where the
    network has it (``robustness.certified.PairCertificate``), else ``sqrt(2) L_l2`` for every pair. PGD attacks
    the float32 network; a certified point it breaks is re-checked in float64 and, if the drop is
    real, raises ``errors.CertificateBroken`` (as the ``certify`` command does)."""
    bound_l2 = float(lipschitz_network(net).logit_l2_bound(radius))
    with torch.no_grad():
        net32, net64 = frozen(net, torch.float32), frozen(net, torch.float64)
        logits = net64(x.double())
    margin = margins(logits, y)
    certificate = PairCertificate.of(net64, logits.shape[1], radius)
    safe = certificate.certified(logits, y, radius)
    broken, delta = pgd_l2(net32, x.float(), y, radius, steps=pgd_steps, restarts=restarts,
                           generator=torch.Generator().manual_seed(seed))
    for i in (safe & broken).nonzero()[:, 0].tolist():
        violation = certificate.violation(net64, x[i], delta[i], y[i])
        if violation is not None:
            raise CertificateBroken(f"point {i}, certified at l2 radius {radius:.6g}, was broken: {violation}")
    correct = margin > 0
    survived = correct & (~broken | safe)  # a certified point "broken" in float32 only was a rounding artefact
    return ClassifierCertificate(radius, bound_l2, float(correct.double().mean()), float(safe.double().mean()),
                                 float(survived.double().mean()))


# ----------------------------------------------------------------------------- in full (certify)


@dataclass(frozen=True)
class Attack:
    """PGD l2 on the margin (``attacks.pgd_l2``): steps per start, starts (the first from the clean
    point, the others random), step length ``step_size * radius / steps``, points per batch."""

    steps: int
    restarts: int
    step_size: float
    batch: int


@dataclass(frozen=True)
class AutoAttack:
    """torchattacks' ``AutoAttack`` class (given: torchattacks is an optional dependency), run on the
    first ``examples`` points in its ``version`` (``standard``)."""

    attack: type
    examples: int
    version: str


@dataclass(frozen=True)
class LowerBoundSearch:
    """Jacobian norms at ``points`` points; then a gradient ascent over ``pairs`` input pairs (from the
    steepest points, a gap of RMS ``gap`` along their steepest direction), ``steps`` of Adam with ``lr``."""

    points: int
    pairs: int
    steps: int
    lr: float
    gap: float


def classifier_report(net: nn.Module, x: Tensor, y: Tensor, *, radii, attack: Attack, lower_bound: LowerBoundSearch,
                      autoattack: AutoAttack | None, curve_max_radius: float, seed: int, where: str) -> dict:
    """What the bound of ``net`` (its ``certified_bound()``, RMS units) buys on ``(x, y)``, as ``certify``
    writes it: certified and PGD accuracy at every radius of ``radii`` (l2, the input's units),
    AutoAttack beside PGD at the first radius, a lower bound on the Lipschitz constant, the weights
    rounded, and the certified-accuracy curve from radius 0 to ``curve_max_radius``. ``where`` names
    the network in a ``CertificateBroken`` message."""
    net, net64 = frozen(net), frozen(net, torch.float64)
    with torch.no_grad():
        logits = torch.cat([net(part) for part in x.split(attack.batch)])
    inputs, outputs = x[0].numel(), logits.shape[1]
    bound = float(net.certified_bound())
    bound_l2 = l2_bound(bound, inputs, outputs)
    margin = margins(logits, y)
    accuracy = float((margin > 0).float().mean())
    # radius -> what the bound certifies there (a ViT's bound holds on the domain the radius fills)
    certificate_at = functools.partial(PairCertificate.of, net64, outputs)
    local = LocalCertificate.of(net64, x, LOCAL_BATCH)

    started = time.perf_counter()
    rows, rounding_only, survived = attack_radius_by_radius(net, net64, x, y, logits, certificate_at, local, bound, radii, attack,
                                                            seed, where)
    for row in rows:  # what the global bound alone certifies, beside it
        global_certificate = PairCertificate.global_bound(float(lipschitz_network(net64).logit_l2_bound(row["radius"])), outputs)
        row["certified_acc_global"] = float(global_certificate.certified(logits, y, row["radius"]).float().mean())
    attack_s = time.perf_counter() - started
    autoattack_row = None
    if autoattack is not None:  # at the first radius
        first = min(float(r) for r in radii)
        autoattack_row = autoattack_beside_pgd(autoattack, net, net64, x, y, logits, certificate_at(first), local, bound,
                                               survived, first, attack.batch, seed, where)
    started = time.perf_counter()
    lower = search_lower_bound(net, net64, x, bound, lower_bound, where)
    lower_bound_s = time.perf_counter() - started

    grid = torch.linspace(0, curve_max_radius, 201).tolist()
    certificate = certificate_at(0.0)
    if torch.equal(certificate.pairs, certificate_at(curve_max_radius).pairs):  # one bound for every radius: exact radii
        radius = certificate.radii(logits, y)
        curve = [float(((margin > 0) & (radius > eps)).float().mean()) for eps in grid]
        median_radius = float(radius.median())
    else:  # each radius its own domain's bound; the median is the grid's largest radius that half the points reach
        curve = [float(((margin > 0) & certificate_at(eps).certified(logits, y, eps)).float().mean()) for eps in grid]
        median_radius = max([eps for eps, fraction in zip(grid, curve) if fraction >= 0.5], default=0.0)
    return {
        "examples": len(x),
        "inputs": inputs,
        "outputs": outputs,
        "bound_rms": bound,
        "bound_l2": bound_l2,
        "certificate": certificate.kind,
        "layer_norms": {k: float(v) for k, v in net.layer_norms().items()} if hasattr(net, "layer_norms") else {},
        "accuracy": accuracy,
        "median_certified_radius": median_radius,
        "radii": rows,
        "attack": {"steps": attack.steps, "restarts": attack.restarts, "step_size": attack.step_size,
                   "float32_only_flips_of_certified_points": rounding_only},
        "autoattack": autoattack_row,
        **lower,
        "weights": weights_in_low_precision(net, x, y, attack.batch, accuracy, bound),
        "curve": {"radius": grid, "certified_acc": curve},
        "timings": {"attack_s": attack_s, "lower_bound_s": lower_bound_s},
    }


def attack_radius_by_radius(net, net64, x, y, logits, certificate_at, local: LocalCertificate | None, bound: float, radii,
                            attack: Attack, seed: int, where: str) -> tuple[list[dict], int, dict]:
    """Certified against attacked accuracy at each radius, ascending: a point broken at a radius is
    broken at every larger one. A certified point (by ``certificate_at(radius)``, or by the ``local``
    certificate where the network has one) that PGD flips raises, unless float64 says the flip is
    float32's rounding; such flips are counted (the second value). The third: the points PGD left
    correctly classified, per radius."""
    generator = torch.Generator().manual_seed(seed)
    broken = ~(margins(logits, y) > 0)  # a misclassified point needs no attack (nor does a NaN margin)
    rows, rounding_only, survived = [], 0, {}
    for eps in sorted(set(float(r) for r in radii)):
        certificate = certificate_at(eps)
        safe = pair_safe = certificate.certified(logits, y, eps)
        locally = local.at(eps) if local is not None else None
        if locally is not None:
            safe_local = locally.certified(y)
            safe = pair_safe | safe_local
        for part in (~broken).nonzero()[:, 0].split(attack.batch):
            hit, delta = pgd_l2(net, x[part], y[part], eps, steps=attack.steps, restarts=attack.restarts,
                                step_size=attack.step_size, generator=generator)
            for i in (safe[part] & hit).nonzero()[:, 0].tolist():
                index = int(part[i])
                if confirmed_break(net64, x, delta[i], y, index, eps, bound, certificate, where, "PGD", locally):
                    continue
                rounding_only += 1  # flipped in float32 only; float64 says the bound holds
                hit[i] = False
            broken[part[hit]] = True
        # a certified point is never broken here: the loop above raised or let it survive
        survivors = ~broken
        survived[eps] = survivors.clone()
        rows.append({"radius": eps, "radius_x255": eps * 255, "certified_acc": float(pair_safe.float().mean()),
                     "empirical_acc": float(survivors.float().mean()), "certified_points": int(pair_safe.sum()),
                     "surviving_points": int(survivors.sum())})
        if locally is not None:
            rows[-1] |= {"certified_acc_local": float(safe_local.float().mean()), "local_tightness": locally.tightness()}
    return rows, rounding_only, survived


def confirmed_break(net64, x, delta, y, index: int, eps: float, bound: float, certificate: PairCertificate, where: str,
                    attack: str, local: LocalAtRadius | None = None) -> bool:
    """A certified point an attack flipped: re-checked in float64, it raises ``CertificateBroken`` with
    the numbers, or it was float32's rounding (False). With ``local``, its per-point drops are checked too."""
    violation = certificate.violation(net64, x[index], delta, y[index])
    if violation is None and local is not None:
        violation = local.violation(net64, x, delta, y, index)
    if violation is None:
        return False
    raise CertificateBroken(
        f"certificate broken: {where}: {attack} flipped validation point {index} within l2 radius {eps:.6g} "
        f"({eps * 255:.4g}/255), where the certified bound {bound:.6g} (RMS units) forbids it: margin "
        f"{violation['margin_before']:.6g} -> {violation['margin_after']:.6g} over l2 distance "
        f"{violation['l2_distance']:.6g}, more than the certified drop {violation['allowed_drop']:.6g} (float64)"
    )


def autoattack_beside_pgd(autoattack: AutoAttack, net, net64, x, y, logits, certificate: PairCertificate,
                          local: LocalCertificate | None, bound: float, survived: dict, eps: float, batch: int, seed: int,
                          where: str) -> dict | None:
    """AutoAttack (l2, ``autoattack.version``) at radius ``eps`` on the first ``autoattack.examples``
    points, beside PGD's result on the same points (``survived[eps]``): where AutoAttack breaks points
    PGD left standing, our attack is weak. A certified point it flips (by the pair bound, or by the
    local certificate ``local`` on all of ``x``, where the network has one) raises, as for PGD."""
    count = min(autoattack.examples, len(x))
    if count == 0:
        return None
    locally = local.at(eps) if local is not None else None  # PGD's, at this radius
    points = torch.arange(count)
    correct = points[margins(logits[:count], y[:count]) > 0]
    started = time.perf_counter()
    hit, delta = autoattack_l2(autoattack.attack, net, x[correct], y[correct], eps, version=autoattack.version, seed=seed,
                               batch=batch)
    safe = certificate.certified(logits[:count], y[:count], eps)
    checked = safe | locally.certified(y)[:count] if locally is not None else safe
    for i in (checked[correct] & hit).nonzero()[:, 0].tolist():
        if not confirmed_break(net64, x, delta[i], y, int(correct[i]), eps, bound, certificate, where, "AutoAttack", locally):
            hit[i] = False  # float32's rounding, as for PGD
    autoattack_survivors = torch.zeros(count, dtype=torch.bool)
    autoattack_survivors[correct] = ~hit
    pgd_survivors = survived[eps][:count]
    return {"radius": eps, "radius_x255": eps * 255, "examples": count, "version": autoattack.version,
            "certified_acc": float(safe.float().mean()), "pgd_acc": float(pgd_survivors.float().mean()),
            "autoattack_acc": float(autoattack_survivors.float().mean()),
            "broken_by_autoattack_only": int((pgd_survivors & ~autoattack_survivors).sum()),
            "broken_by_pgd_only": int((~pgd_survivors & autoattack_survivors).sum()),
            "seconds": time.perf_counter() - started}


def search_lower_bound(net, net64, x, bound: float, search: LowerBoundSearch, where: str) -> dict:
    """A lower bound on the Lipschitz constant: Jacobian norms at validation points, then a pair
    search from the steepest of them. One above the certified bound raises ``CertificateBroken``."""
    sample = x[: search.points]
    norms, directions = jacobian_norms(net64, sample.double())
    order = norms.argsort(descending=True)[: search.pairs]
    searched, row = pair_search(net, net64, sample[order], directions[order], steps=search.steps, lr=search.lr, gap=search.gap)
    jacobian_best = float(norms.max())
    lower = max(jacobian_best, searched)
    if lower > bound * (1 + SLACK):
        how = (f"the Jacobian at validation point {int(norms.argmax())} has RMS->RMS norm {jacobian_best:.8g}" if jacobian_best >= searched
               else f"a pair search from validation point {int(order[row])} found rms(f(a) - f(b)) / rms(a - b) = {searched:.8g}")
        raise CertificateBroken(f"certificate broken: {where}: {how} (float64), above the certified bound {bound:.8g}")
    return {"lower_bound": lower, "lower_bound_jacobian": jacobian_best, "lower_bound_pair_search": searched,
            "lower_bound_points": len(sample), "bound_over_lower_bound": bound / lower if lower > 0 else math.inf}
