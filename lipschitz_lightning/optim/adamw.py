"""AdamW in the paper's form and in ``torch.optim.AdamW``'s form (SPEC §5).

``variant="reference"``: the paper's Adam, no bias correction and ``eps`` inside the square root's
sum (``D = m / (sqrt(v) + eps)``, ``eps = 1e-12``). ``torch.optim.AdamW`` always bias-corrects, so
this variant is a small optimizer of our own; ``variant="torch"`` returns ``torch.optim.AdamW``
itself. Both decay by ``lr * group["weight_decay"]`` (= ``wd * lr * t``, see ``roles.param_groups``)
and step by ``lr`` times the Adam direction: the target norms only scale the decay and the soft
cap's coupling, as in the reference.
"""

from __future__ import annotations

from typing import Literal

import torch

from lipschitz_lightning.core.roles import with_target_weight_decay
from lipschitz_lightning.core.types import Betas, NonNegative, Positive

VARIANTS = ("reference", "torch")


class ReferenceAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-12, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
        return loss


def AdamW(
    params,
    lr: Positive,
    betas: Betas = (0.9, 0.95),
    eps: Positive = 1e-12,
    variant: Literal[VARIANTS] = "reference",
    weight_decay: NonNegative = 0.0,
):
    """Build the chosen AdamW variant over ``params`` (groups from ``roles.param_groups``); ``weight_decay`` is the base ``wd``."""
    if variant == "reference":
        return ReferenceAdamW(with_target_weight_decay(params, weight_decay), lr=lr, betas=betas, eps=eps)
    if variant == "torch":
        return torch.optim.AdamW(with_target_weight_decay(params, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"optimizer.variant must be one of {list(VARIANTS)}, got {variant!r}")
