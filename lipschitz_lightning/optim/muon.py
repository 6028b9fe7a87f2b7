"""Muon with Modula dualization (SPEC §4) and the paper's per-layer target norms (SPEC §5).

Why not ``torch.optim.Muon``: its momentum is ``buf = mu * buf + g`` (the paper averages,
``buf = beta * buf + (1 - beta) * g``), its Newton-Schulz runs one ``(a, b, c)`` triple for every
step (the paper's small-model set changes coefficients each step), its step is rescaled by a
shape rule (``AdjustLR``) instead of ``scale * target_norm``, its weight decay is ``lr * wd`` rather
than ``wd * lr * t``, and it has no embedding dualization. Any one of these changes the
trajectory and the soft cap's guarantee, so this is a small ``torch.optim.Optimizer`` of our own.

It is also the NanoGPT recipe's whole optimizer, where modded-nanogpt uses one Adam and three Muons:
per-role learning rates (``role_lr``), a momentum warm-up, and Adam for the roles listed in
``adam_roles`` (the embedding there) and for anything that is not a matrix (SPEC §4: a bias or a
gain goes to Adam). One optimizer keeps Lightning's automatic optimization, one LR scheduler and
one constraint hook.

Matrices of one shape are orthogonalized as one stack, and under DDP each rank orthogonalizes a
share of every stack and one all-gather hands out the results (``distributed.shared_out``), as in
modded-nanogpt's distributed Muon.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch

from lipschitz_lightning.constraints import NS_COEFFICIENTS, POLYNOMIAL_FORMS, layer_scale, normalize_token_vectors, orthogonalize
from lipschitz_lightning.distributed import shared_out
from lipschitz_lightning.distributed import stack as stack_of
from lipschitz_lightning.optim.roles import Role, is_matrix_role, with_target_weight_decay
from lipschitz_lightning.schema import Betas, NonNegative, NonNegativeInt, Positive, UnitInterval

ROLES = tuple(role.value for role in Role)


class Muon(torch.optim.Optimizer):
    """Muon for groups built by ``optim.roles.param_groups`` (each carries ``role`` and ``target_norm``).

    ``weight_decay`` is the base ``wd``; each group decays by ``wd * lr * t``.

    Per step and weight (SPEC §3): ``buf`` averages gradients; ``D = orth(buf) * scale * t`` for
    matrices, token-vector normalisation with the inflation factor times ``t`` for embeddings;
    ``W <- W * (1 - lr * weight_decay)``; ``W <- W - lr * D``. Adam-stepped weights take
    ``D = m_hat / (sqrt(v_hat) + eps)`` (``torch.optim.Adam``'s, with bias correction).

    ``role_lr`` gives a role its own learning rate (the NanoGPT recipe: ``head: 0.005``,
    ``embedding: 0.1``); other Adam-stepped weights use ``adam_lr``, the rest ``lr``. With
    ``momentum_warmup_steps > 0`` the momentum rises linearly from ``momentum_warmup_start`` to
    ``momentum`` over that many steps. ``polynomial_form`` chooses how Newton-Schulz is evaluated
    (``constraints.odd_polynomial_steps``: ``auto`` takes the Gram form for wide float32 matrices).
    """

    def __init__(
        self,
        params,
        lr: Positive = 0.1,
        momentum: UnitInterval = 0.9,
        nesterov: bool = False,
        weight_decay: NonNegative = 0.0,
        ns_coefficients: Literal[tuple(NS_COEFFICIENTS)] = "small",
        ns_dtype: Literal["float32", "bfloat16"] = "float32",
        embed_inflation: Positive = 16.0,
        role_lr: dict[Literal[ROLES], Positive] | None = None,
        momentum_warmup_start: UnitInterval = 0.85,
        momentum_warmup_steps: NonNegativeInt = 0,
        adam_roles: list[Literal[ROLES]] = (),
        adam_lr: Positive = 1e-3,
        adam_betas: Betas = (0.9, 0.95),
        adam_eps: Positive = 1e-8,
        polynomial_form: Literal[POLYNOMIAL_FORMS] = "auto",
    ):
        role_lr, adam_roles = dict(role_lr or {}), tuple(adam_roles)
        groups = with_target_weight_decay(params, weight_decay)
        for group in groups:
            role = group.setdefault("role", Role.HIDDEN.value)
            group.setdefault("target_norm", 1.0)
            # Adam for the roles asked for, and for whatever is not a matrix (SPEC §4)
            group["adam"] = role in adam_roles or any(p.ndim != 2 for p in group["params"])
            group["lr"] = role_lr.get(role, adam_lr if group["adam"] else lr)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, step=0)
        super().__init__(groups, defaults)
        self.ns_coefficients = ns_coefficients
        self.ns_dtype = getattr(torch, ns_dtype)
        self.embed_inflation = embed_inflation
        self.warmup_start, self.warmup_steps = momentum_warmup_start, momentum_warmup_steps
        self.adam_betas, self.adam_eps = tuple(adam_betas), adam_eps
        self.polynomial_form = polynomial_form

    def momentum_at(self, group: dict) -> float:
        if self.warmup_steps == 0:
            return group["momentum"]
        progress = min(group["step"] / self.warmup_steps, 1.0)
        return (1 - progress) * self.warmup_start + progress * group["momentum"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stacks: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["adam"]:
                    self._adam_step(p, group)
                    continue
                update = self._momentum(p, group)
                if is_matrix_role(group["role"]):
                    stacks[(tuple(p.shape), p.device)].append((p, group, update))
                else:  # an embedding: normalise each token vector (nn.Embedding stores one per row)
                    self._apply(p, group, normalize_token_vectors(update, self.embed_inflation, dim=-1) * group["target_norm"])
        for stack in stacks.values():
            updates = stack_of([update for _, _, update in stack])
            (directions,) = shared_out(
                len(stack), lambda rows: (orthogonalize(updates[rows], self.ns_coefficients, self.ns_dtype, self.polynomial_form),)
            )
            for (p, group, _), direction in zip(stack, directions):
                self._apply(p, group, direction * (layer_scale(p) * group["target_norm"]))
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, beta = state["momentum_buffer"], self.momentum_at(group)
        if group["nesterov"]:
            # modded-nanogpt's form: average, then look ahead along the average
            buf.lerp_(p.grad, 1 - beta)
            return p.grad.lerp(buf, beta)
        buf.mul_(beta).add_(p.grad, alpha=1 - beta)
        return buf

    def _apply(self, p: torch.Tensor, group: dict, direction: torch.Tensor) -> None:
        if group["weight_decay"]:  # a pass over the weights saved, and p * 1.0 is p exactly
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.to(p.dtype), alpha=-group["lr"])

    def _adam_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["exp_avg"], state["exp_avg_sq"], state["adam_step"] = torch.zeros_like(p), torch.zeros_like(p), 0
        (beta1, beta2), m, v = self.adam_betas, state["exp_avg"], state["exp_avg_sq"]
        state["adam_step"] += 1
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** state["adam_step"])
        v_hat = v / (1 - beta2 ** state["adam_step"])
        self._apply(p, group, m_hat / (v_hat.sqrt() + self.adam_eps))
