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

Matrices of one shape are orthogonalized as one stack. Under DDP the step is modded-nanogpt's
distributed Muon, extended to the whole step: one reduce-scatter of the gradients, each rank steps
and projects the weights it owns (the head and embedding split by rows), one all-gather of the
weights (``core.sharding.ShardedStep``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import ClassVar, Literal

import torch

from lipschitz_lightning.core.constraints import normalize_token_vectors
from lipschitz_lightning.core.linalg import (
    NS_COEFFICIENTS,
    POLYNOMIAL_FORMS,
    layer_scale,
    ns_max_singular_value,
    orthogonalize,
)
from lipschitz_lightning.core.roles import (
    Role,
    is_matrix_role,
    with_target_weight_decay,
)
from lipschitz_lightning.core.sharding import (
    ShardedStep,
    ShardPlan,
    all_gather_into,
    rank_and_world,
)
from lipschitz_lightning.core.sharding import stack as stack_of
from lipschitz_lightning.core.types import (
    Betas,
    NonNegative,
    NonNegativeInt,
    Positive,
    UnitInterval,
)

ROLES = tuple(role.value for role in Role)


class Muon(torch.optim.Optimizer):
    """Muon for groups built by ``core.roles.param_groups`` (each carries ``role`` and ``target_norm``).

    Under ``torch.distributed`` with several ranks every step is sharded (``core.sharding.ShardedStep``):
    each rank steps and projects the weights it owns. ``reduce_gradients`` says whether the step
    reduces the gradients itself (the project's ``trainer=ddp`` strategy sets it, and wraps no
    DDP) or finds them averaged already (Lightning's plain ``ddp``).

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

    reduce_gradients: ClassVar[bool] = False  # an instance attribute once a strategy sets it

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
        self.projection: Callable[[ShardedStep], None] | None = None
        self._sharded: ShardedStep | None = None
        self._cut: set[int] = set()  # split matrices whose state holds this rank's rows only

    def momentum_at(self, group: dict) -> float:
        if self.warmup_steps == 0:
            return group["momentum"]
        progress = min(group["step"] / self.warmup_steps, 1.0)
        return (1 - progress) * self.warmup_start + progress * group["momentum"]

    # ------------------------------------------------------------------ what others may ask of it

    def step_spectral_bound(self, group: dict) -> float | None:
        """The largest spectral norm of a matrix's step direction per unit ``lr * t`` (``projection.StepBound``):
        the largest singular value Newton-Schulz can output for its coefficients (proven:
        ``linalg.ns_max_singular_value``) times a margin for rounding, which is measured, not proven:
        1e-4 in float32 (the tests measure below 1e-5 for either polynomial form), 5% in a 16-bit
        precision (the paper's NanoGPT recipe's margin for bfloat16). None for what is not stepped
        by Newton-Schulz (Adam's weights, embeddings)."""
        if group["adam"] or not is_matrix_role(group["role"]):
            return None
        margin = 1 + 1e-4 if self.ns_dtype in (torch.float32, torch.float64) else 1.05
        return ns_max_singular_value(self.ns_coefficients) * margin

    def attach_projection(self, project: Callable[[ShardedStep], None]) -> None:
        """Run the constraint's projection inside a sharded step, on the weights this rank owns,
        before the one all-gather shares them (``core.projection.ShardsItsStep``: ``Projection.attach``
        calls this, as the ``lit.constraint.WeightConstraint`` callback attaches the projection)."""
        self.projection = project

    @property
    def shards_its_step(self) -> bool:
        """Whether each step is split across the ranks (``core.sharding.ShardedStep``)."""
        return rank_and_world()[1] > 1

    @property
    def shard_plan(self) -> ShardPlan | None:
        """Which rank owns which piece of which weight (``core.sharding.ShardPlan``), once a sharded step has run."""
        return None if self._sharded is None else self._sharded.plan

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.shards_its_step:
            self._sharded_step()
        else:
            self._local_step()
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _local_step(self) -> None:
        stacks: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["adam"]:
                    self._adam_step(p, group, p.grad, self.state[p])
                    continue
                update = self._momentum(p.grad, group, self.state[p])
                if is_matrix_role(group["role"]):
                    stacks[(tuple(p.shape), p.device)].append((p, group, update))
                else:
                    self._embedding_step(p, group, update)
        for stack in stacks.values():
            self._orthogonalized_step(stack)

    def _orthogonalized_step(self, stack: list) -> None:
        """One batched Newton-Schulz over matrices of one shape, then their steps."""
        directions = orthogonalize(stack_of([update for _, _, update in stack]), self.ns_coefficients, self.ns_dtype, self.polynomial_form)
        for (p, group, _), direction in zip(stack, directions):
            self._apply(p, group, direction * (layer_scale(p) * group["target_norm"]))

    def _sharded_step(self) -> None:
        """The step of SPEC §3 on the pieces this rank owns (``core.sharding.ShardedStep``): one
        reduce-scatter of the gradients, the owned weights stepped and projected, one all-gather."""
        if self._sharded is None:
            self._sharded = ShardedStep([p for group in self.param_groups for p in group["params"]])
            self._drop_foreign_state()
        sharded = self._sharded
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        stacks: dict[tuple, list] = defaultdict(list)
        split = []
        for piece, grad in zip(sharded.pieces, sharded.gradients(reduce=self.reduce_gradients)):
            p = sharded.params[piece.index]
            group, weight = group_of[id(p)], p if piece.rows is None else p[piece.rows]
            state = self._piece_state(p, piece.rows)
            if group["adam"]:
                self._adam_step(weight, group, grad, state)
                continue
            update = self._momentum(grad, group, state)
            if not is_matrix_role(group["role"]):
                self._embedding_step(weight, group, update)
            elif piece.rows is None:
                stacks[(tuple(p.shape), p.device)].append((p, group, update))
            else:
                split.append((p, group, weight, update, sharded.row_shard(p)))
        for stack in stacks.values():
            self._orthogonalized_step(stack)
        # every rank holds rows (maybe none) of every split matrix and sums its Gram matrices with
        # the others', in the same order
        for p, group, weight, update, shard in split:
            direction = orthogonalize(update, self.ns_coefficients, self.ns_dtype, self.polynomial_form, shard)
            self._apply(weight, group, direction * (layer_scale(p) * group["target_norm"]))
        if self.projection is not None:
            self.projection(sharded)
        sharded.share_weights()

    def _momentum(self, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        if not state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf, beta = state["momentum_buffer"], self.momentum_at(group)
        if group["nesterov"]:
            # modded-nanogpt's form: average, then look ahead along the average
            buf.lerp_(grad, 1 - beta)
            return grad.lerp(buf, beta)
        buf.mul_(beta).add_(grad, alpha=1 - beta)
        return buf

    def _apply(self, weight: torch.Tensor, group: dict, direction: torch.Tensor) -> None:
        if group["weight_decay"]:  # a pass over the weights saved, and p * 1.0 is p exactly
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        weight.add_(direction.to(weight.dtype), alpha=-group["lr"])

    def _embedding_step(self, weight: torch.Tensor, group: dict, update: torch.Tensor) -> None:
        """An embedding's step: each token vector (nn.Embedding stores one per row) normalised."""
        self._apply(weight, group, normalize_token_vectors(update, self.embed_inflation, dim=-1) * group["target_norm"])

    def _adam_step(self, weight: torch.Tensor, group: dict, grad: torch.Tensor, state: dict) -> None:
        if not state:
            state["exp_avg"], state["exp_avg_sq"], state["adam_step"] = torch.zeros_like(grad), torch.zeros_like(grad), 0
        (beta1, beta2), m, v = self.adam_betas, state["exp_avg"], state["exp_avg_sq"]
        state["adam_step"] += 1
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** state["adam_step"])
        v_hat = v / (1 - beta2 ** state["adam_step"])
        self._apply(weight, group, m_hat / (v_hat.sqrt() + self.adam_eps))

    # ------------------------------------------------------------------ sharded state

    def _piece_state(self, p: torch.Tensor, rows: slice | None) -> dict:
        """The state of this rank's piece of ``p``: a split matrix's state holds this rank's rows
        only (a checkpoint, which holds all of them, is cut to them on first use)."""
        state = self.state[p]
        if rows is not None and id(p) not in self._cut:
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    state[key] = value[rows].clone()
            self._cut.add(id(p))
        return state

    def _drop_foreign_state(self) -> None:
        """After loading a checkpoint every rank holds every weight's state: keep what it owns."""
        for p in self._sharded.params:
            if self._sharded.part(p) is False:
                self.state.pop(p, None)

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, with the whole state of every weight. Sharded,
        that is a collective (every rank must call it, as Lightning's checkpointing does): the
        pieces' states are all-gathered, through the same plan as the weights."""
        state = super().state_dict()
        if self._sharded is not None:
            state["state"] = self._gathered_state()
        return state

    def _gathered_state(self) -> dict[int, dict]:
        sharded, plan = self._sharded, self._sharded.plan
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        keys_of = [("exp_avg", "exp_avg_sq") if group_of[id(p)]["adam"] else ("momentum_buffer",) for p in sharded.params]
        gathered: dict[int, dict] = {index: {} for index in range(len(sharded.params))}
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            holders = [key in keys for keys in keys_of]
            if not any(holders):
                continue
            pieces = [self.state[sharded.params[piece.index]].get(key) if holders[piece.index] else None for piece in sharded.pieces]
            mine = torch.zeros(plan.segment, dtype=sharded.dtype, device=sharded.params[0].device)
            offset = 0
            for piece, value in zip(sharded.pieces, pieces):
                if value is not None:
                    mine[offset : offset + piece.numel].copy_(value.reshape(-1))
                offset += piece.numel
            flat = torch.empty(plan.world * plan.segment, dtype=mine.dtype, device=mine.device)
            all_gather_into(flat, mine)
            full = [torch.zeros_like(p) if holders[index] else None for index, p in enumerate(sharded.params)]
            for rank in range(plan.world):
                plan.unpack(rank, flat[rank * plan.segment : (rank + 1) * plan.segment], full)
            for index, tensor in enumerate(full):
                if tensor is not None:
                    gathered[index][key] = tensor
        for index, p in enumerate(sharded.params):
            if group_of[id(p)]["adam"]:
                gathered[index]["adam_step"] = group_of[id(p)]["step"]  # every piece steps every step
        return gathered
