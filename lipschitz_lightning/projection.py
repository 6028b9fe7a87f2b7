"""The projection step of SPEC §3 for a whole model: every weight back into its ball.

Pure torch (``torch.distributed`` where a process group exists), no Lightning: the
``WeightConstraint`` callback only decides when ``Projector.project`` runs.

At NanoGPT scale a per-parameter loop is the wrong shape: 73 matrices, most of them 768x768,
projected one by one on every one of 8 GPUs. Here matrices of one shape form one stack and go
through one batched call, and each rank projects a share of every stack (``distributed.shared_out``);
one all-gather per stack gives every rank the same bits.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from lipschitz_lightning.constraints import (
    POWER_ITERATION_METHODS,
    project_embedding,
    project_stack,
    random_start_vector,
)
from lipschitz_lightning.distributed import shared_out
from lipschitz_lightning.distributed import stack as stack_of
from lipschitz_lightning.lipschitz import rms_norm
from lipschitz_lightning.optim.roles import Role, step_coefficients


@dataclass(frozen=True)
class ConstrainedWeight:
    name: str
    param: Tensor
    role: str
    group: dict  # the optimizer's param group: the step's lr and weight decay are read from it
    step_bounded: bool  # the optimizer's step has spectral norm at most lr * t * update_sigma_max (Muon)


def constrained_weights(optimizers) -> list[ConstrainedWeight]:
    """Every parameter of the optimizers with its name and role (groups from ``roles.param_groups``)."""
    weights = []
    for optimizer in optimizers:
        for group_index, group in enumerate(optimizer.param_groups):
            role = group.get("role", Role.HIDDEN.value)
            for index, param in enumerate(group["params"]):
                name = group.get("name") if len(group["params"]) == 1 and "name" in group else f"group{group_index}.{index}"
                bounded = hasattr(optimizer, "ns_coefficients") and not group.get("adam", False)
                weights.append(ConstrainedWeight(name, param, role, group, bounded))
    return weights


class Projector:
    """Projects every matrix of some optimizers with one constraint method after each step.

    Matrices are stacked by shape; embeddings (rows are token vectors) are pulled back to RMS at
    most ``embed_w_max``; parameters that are neither (a bias, a gain) are left alone, since a
    spectral ball means nothing for them. ``fallbacks`` counts the matrices where a guard replaced
    the method by the exact cap (see ``constraints.project_stack``).
    """

    def __init__(
        self,
        weights: list[ConstrainedWeight],
        method: str,
        *,
        w_max: float,
        head_w_max: float,
        embed_w_max: float,
        coupling: str,
        spectral_wd: float,
        power_iters: int,
        update_sigma_max: float,
        guard: bool = True,
        form: str = "auto",
    ):
        self.method, self.w_max, self.head_w_max, self.embed_w_max = method, w_max, head_w_max, embed_w_max
        self.coupling, self.spectral_wd, self.power_iters = coupling, spectral_wd, power_iters
        self.update_sigma_max, self.guard, self.form = update_sigma_max, guard, form
        self.embeddings = [w for w in weights if w.role == Role.EMBEDDING.value]
        stacks: dict[tuple, list[ConstrainedWeight]] = defaultdict(list)
        for weight in weights:
            if weight.role != Role.EMBEDDING.value and weight.param.ndim == 2:
                stacks[(tuple(weight.param.shape), weight.param.device, weight.param.dtype)].append(weight)
        self.stacks = list(stacks.values())
        self.power_states: dict[str, Tensor] = {}
        self.fallbacks = torch.zeros((), dtype=torch.int64)

    def cap(self, weight: ConstrainedWeight) -> float:
        return self.head_w_max if weight.role == Role.HEAD.value else self.w_max

    def _power_states(self, stack: list[ConstrainedWeight]) -> Tensor | None:
        if self.method not in POWER_ITERATION_METHODS:
            return None
        states = []
        for weight in stack:
            state = self.power_states.get(weight.name)
            if state is None:
                state = random_start_vector(weight.param.float())
            states.append(state.to(weight.param.device, torch.float32))
        return torch.stack(states)

    @torch.no_grad()
    def project(self) -> None:
        if self.method == "none":  # the unconstrained baseline: decay is its only regulariser
            return
        for weight in self.embeddings:
            weight.param.copy_(project_embedding(weight.param, self.embed_w_max))
        for stack in self.stacks:
            W = stack_of([weight.param.float() for weight in stack])
            caps = tuple(self.cap(weight) for weight in stack)
            lr_t, wd_eff = zip(*(step_coefficients(weight.group) for weight in stack))
            states = self._power_states(stack)
            bounded = tuple(weight.step_bounded for weight in stack)

            def compute(rows: slice) -> tuple[Tensor, ...]:
                state = None if states is None else states[rows].clone()
                projected, fell_back = project_stack(
                    W[rows], self.method, w_max=caps[rows], lr_t=lr_t[rows], wd_eff=wd_eff[rows],
                    spectral_wd=self.spectral_wd, coupling=self.coupling, update_sigma_max=self.update_sigma_max,
                    power_iters=self.power_iters, power_state=state, guard=self.guard, step_bounded=bounded[rows], form=self.form,
                )
                return (projected, fell_back.to(projected.device)) + (() if state is None else (state,))

            projected, fell_back, *new_states = shared_out(len(stack), compute)
            for weight, value in zip(stack, projected):
                weight.param.copy_(value)
            if new_states:
                for weight, state in zip(stack, new_states[0]):
                    self.power_states[weight.name] = state
            self.fallbacks = self.fallbacks.to(fell_back.device) + fell_back.sum()

    @torch.no_grad()
    def scale_into_ball(self) -> None:
        """Start inside the ball: a matrix initialised above its cap is scaled down to it once."""
        if self.method in ("none", "spectral_weight_decay"):  # no ball to start in
            return
        for weight in self.embeddings:
            weight.param.copy_(project_embedding(weight.param, self.embed_w_max))
        for stack in self.stacks:
            for weight in stack:
                norm = rms_norm(weight.param)
                if norm > self.cap(weight):
                    weight.param.mul_(self.cap(weight) / norm)
