"""Muon with Modula dualization (SPEC §4) and the paper's per-layer target norms (SPEC §5).

Why not ``torch.optim.Muon``: its momentum is ``buf = mu * buf + g`` (the paper averages,
``buf = beta * buf + (1 - beta) * g``), its Newton-Schulz runs one ``(a, b, c)`` triple for every
step (the paper's small-model set changes coefficients each step), its step is rescaled by a
shape rule (``AdjustLR``) instead of ``scale * target_norm``, its weight decay is ``lr * wd`` rather
than ``wd * lr * t``, and it has no embedding dualization. Any one of these changes the
trajectory and the soft cap's guarantee, so this is a small ``torch.optim.Optimizer`` of our own.
"""

from __future__ import annotations

import torch

from lipschitz_lightning.constraints import layer_scale, normalize_token_vectors, orthogonalize
from lipschitz_lightning.optim.roles import Role, is_matrix_role, with_target_weight_decay


class Muon(torch.optim.Optimizer):
    """Muon for groups built by ``optim.roles.param_groups`` (each carries ``role`` and ``target_norm``).

    ``weight_decay`` is the base ``wd``; each group decays by ``wd * lr * t``.

    Per step and weight (SPEC §3): ``buf`` averages gradients; ``D = orth(buf) * scale * t`` for
    matrices, token-vector normalisation with the inflation factor times ``t`` for embeddings;
    ``W <- W * (1 - lr * weight_decay)``; ``W <- W - lr * D``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        ns_coefficients: str = "small",
        ns_dtype: str = "float32",
        embed_inflation: float = 16.0,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            target_norm=1.0,
            role=Role.HIDDEN.value,
        )
        super().__init__(with_target_weight_decay(params, weight_decay), defaults)
        self.ns_coefficients = ns_coefficients
        self.ns_dtype = getattr(torch, ns_dtype)
        self.embed_inflation = embed_inflation

    def _direction(self, buf: torch.Tensor, role: str, target_norm: float) -> torch.Tensor:
        if is_matrix_role(role):
            return orthogonalize(buf, self.ns_coefficients, self.ns_dtype) * (layer_scale(buf) * target_norm)
        # nn.Embedding stores one token per row
        return normalize_token_vectors(buf, self.embed_inflation, dim=-1) * target_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                if group["nesterov"]:
                    # modded-nanogpt's form: average, then look ahead along the average
                    buf.lerp_(p.grad, 1 - beta)
                    update = p.grad.lerp(buf, beta)
                else:
                    buf.mul_(beta).add_(p.grad, alpha=1 - beta)
                    update = buf
                direction = self._direction(update, group["role"], group["target_norm"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(direction, alpha=-lr)
        return loss
