"""Attacks on a certificate, in pure torch: PGD in l2 (what the bound's guarantee must survive),
AutoAttack (torchattacks', the standard ensemble: evidence that our PGD is not weak) and the search
for a Lipschitz lower bound (how tight the bound is). A certified point an attack breaks, or a lower
bound above the certified one, refutes the bound."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipschitz_lightning.robustness.certified import SLACK, margins


def _per_point(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *(1,) * (like.ndim - 1))


def project_l2(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """``delta`` back into the l2 ball of radius ``eps``, then ``x + delta`` into the pixel box ``[0, 1]``
    (clipping to the box only shortens ``delta``, so the result is in both)."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    delta = delta * _per_point((eps / norms).clamp(max=1.0), delta)
    return (x + delta).clamp(0, 1) - x


def pgd_l2(
    net: nn.Module, x: Tensor, labels: Tensor, eps: float, *, steps: int, restarts: int,
    step_size: float = 2.5, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A PGD l2 attack on the margin: ``steps`` normalised-gradient steps of length
    ``step_size * eps / steps``, each projected onto the l2 ball of radius ``eps`` and the pixel box.
    The first start is the clean point, each further restart a random point of the ball's surface.

    Returns ``(broken, delta)``: which points some iterate misclassified (margin <= 0), and for those
    the first perturbation that did (zeros for the others). A point leaves the attack as soon as it
    is broken.
    """
    broken = torch.zeros(len(x), dtype=torch.bool)
    found = torch.zeros_like(x)
    alpha = step_size * eps / steps
    for restart in range(restarts):
        active = (~broken).nonzero()[:, 0]
        delta = torch.zeros_like(x[active])
        if restart:
            delta = project_l2(torch.randn(delta.shape, generator=generator).to(delta) * eps, x[active], eps)
        for step in range(steps + 1):
            if not len(active):
                break
            xs = x[active]
            delta.requires_grad_(True)
            margin = margins(net(xs + delta), labels[active])
            hit = margin.detach() <= 0
            found[active[hit]] = delta.detach()[hit]
            broken[active[hit]] = True
            if step == steps:
                break
            (grad,) = torch.autograd.grad(-margin.sum(), delta)
            with torch.no_grad():
                keep = ~hit
                grad, delta, xs, active = grad[keep], delta.detach()[keep], xs[keep], active[keep]
                norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                delta = project_l2(delta + alpha * grad / _per_point(norms, grad), xs, eps)
    return broken, found


def autoattack_l2(auto_attack: type, net: nn.Module, x: Tensor, labels: Tensor, eps: float, *, version: str = "standard",
                  seed: int = 0, batch: int = 500) -> tuple[Tensor, Tensor]:
    """AutoAttack in l2 at radius ``eps`` (torchattacks' ``AutoAttack`` class, given as ``auto_attack``:
    APGD-CE, APGD-T, FAB-T and Square in its standard version), in the pixel box [0, 1]. Images are
    ``(N, H, W, C)`` here and ``(N, C, H, W)`` there (Square draws its patches over H and W), so the
    attack sees a view that permutes them back. Returns ``(broken, delta)`` as ``pgd_l2``: the
    misclassified adversarial points and their perturbations (zeros for the others)."""
    image = x.ndim == 4 and x.shape[-1] in (1, 3)
    channels_first = (lambda t: t.permute(0, 3, 1, 2)) if image else (lambda t: t)
    channels_last = (lambda t: t.permute(0, 2, 3, 1)) if image else (lambda t: t)

    class ChannelsFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net  # a submodule: torchattacks reads the device from the parameters (else it prints, per batch)

        def forward(self, t: Tensor) -> Tensor:
            return self.net(channels_last(t))

    attack = auto_attack(ChannelsFirst(), norm="L2", eps=eps, version=version, n_classes=_classes(net, x), seed=seed)
    broken = torch.zeros(len(x), dtype=torch.bool)
    delta = torch.zeros_like(x)
    for part in torch.arange(len(x)).split(batch):
        adversarial = channels_last(attack(channels_first(x[part]).contiguous(), labels[part])).contiguous()
        with torch.no_grad():
            hit = margins(net(adversarial), labels[part]) <= 0
        broken[part] = hit
        delta[part] = torch.where(_per_point(hit, x[part]), adversarial - x[part], 0.0)
    return broken, delta


def _classes(net: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return net(x[:1]).shape[-1]


@torch.no_grad()
def lipschitz_violation(net64: nn.Module, x: Tensor, delta: Tensor, label: Tensor, bound_l2: float) -> dict | None:
    """Re-check, in float64, whether ``x`` and ``x + delta`` contradict the bound: the margin fell by
    more than ``sqrt(2) L_l2 ||delta||``. Returns the numbers when it did, else None (a float32
    rounding artefact of the attack, not a contradiction)."""
    x64, d64 = x.double()[None], delta.double()[None]
    before, after = (float(margins(net64(point), label.view(1))) for point in (x64, x64 + d64))
    distance = float(d64.norm())
    allowed = math.sqrt(2) * bound_l2 * distance
    if before - after > allowed * (1 + SLACK):
        return {"margin_before": before, "margin_after": after, "l2_distance": distance, "allowed_drop": allowed}
    return None


# ---------------------------------------------------------------------------- lower bounds


def rms(v: Tensor) -> Tensor:
    """Per-row RMS of a batch."""
    return v.flatten(1).pow(2).mean(dim=1).sqrt()


def jacobians(net: nn.Module, x: Tensor, chunk: int = 250) -> Tensor:
    """The network's Jacobians at the points ``x``: ``(N, outputs, inputs)``."""
    jacobian = torch.func.vmap(torch.func.jacrev(lambda point: net(point[None])[0]))
    return torch.cat([jacobian(part).flatten(2) for part in x.split(chunk)])


def jacobian_norms(net: nn.Module, x: Tensor, chunk: int = 250) -> tuple[Tensor, Tensor]:
    """The RMS->RMS norm ``sqrt(inputs / outputs) sigma_max(J)`` of the Jacobian at each point, and its
    top right singular vector (the input direction it stretches most), in the dtype of ``net``.

    The Lipschitz constant is the supremum of this norm over inputs, so each value is a lower bound.
    """
    norms, directions = [], []
    for part in x.split(chunk):
        J = jacobians(net, part, chunk)
        outputs, inputs = J.shape[1:]
        # from the small (outputs x outputs) Gram matrix J J^T: sigma_max^2 and the top left vector u;
        # the right one is J^T u / sigma_max
        eigenvalues, U = torch.linalg.eigh(J @ J.transpose(1, 2))
        sigma = eigenvalues[:, -1].clamp(min=0).sqrt()
        directions.append((J.transpose(1, 2) @ U[:, :, -1:])[:, :, 0] / sigma.clamp(min=1e-30)[:, None])
        norms.append(sigma * math.sqrt(inputs / outputs))
    return torch.cat(norms).detach(), torch.cat(directions).detach()


@torch.no_grad()
def rms_ratio(net: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``rms(f(a) - f(b)) / rms(a - b)`` per pair (in the dtype of ``net`` and the points)."""
    return rms(net(a) - net(b)) / rms(a - b)


def pair_search(
    net: nn.Module, net64: nn.Module, start: Tensor, direction: Tensor, *, steps: int, lr: float, gap: float,
) -> tuple[float, int]:
    """Gradient ascent (Adam, in float32) on ``rms(f(a) - f(b)) / rms(a - b)`` over pairs kept in the
    pixel box, from ``a = start``, ``b = start + gap * direction`` (``rms(b - a) = gap`` before the
    box). Every pair each row reaches is a valid witness, so the best one of each row is kept and
    evaluated again in float64 (float32 loses digits in ``f(a) - f(b)`` for close pairs).

    Returns the largest float64 ratio and the row that reached it.
    """
    start, direction = start.detach(), direction.detach().reshape(start.shape)
    direction = direction / _per_point(rms(direction).clamp(min=1e-30), direction)
    a = start.clone().float().requires_grad_(True)
    b = (start + gap * direction).clamp(0, 1).float().requires_grad_(True)
    best_a, best_b = a.detach().clone(), b.detach().clone()
    best = torch.full((len(start),), -1.0)
    search = torch.optim.Adam([a, b], lr=lr)
    for step in range(steps + 1):
        ratio = rms(net(a) - net(b)) / rms(a - b).clamp(min=1e-12)
        better = ratio.detach() > best
        best_a[better], best_b[better], best[better] = a.detach()[better], b.detach()[better], ratio.detach()[better]
        if step == steps:
            break
        search.zero_grad()
        (-ratio.sum()).backward()
        search.step()
        with torch.no_grad():
            a.clamp_(0, 1), b.clamp_(0, 1)
    exact = torch.nan_to_num(rms_ratio(net64, best_a.double(), best_b.double()), nan=0.0)
    row = int(exact.argmax())
    return float(exact[row]), row
