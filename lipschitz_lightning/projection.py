"""The projection step of SPEC §3 for a whole model: every weight back into its ball.

Pure torch (``torch.distributed`` where a process group exists), no Lightning: the
``WeightConstraint`` callback only decides when ``Projector.project`` runs.

At NanoGPT scale a per-parameter loop is the wrong shape: 73 matrices, most of them 768x768,
projected one by one on every one of 8 GPUs. Here matrices of one shape form one stack and go
through one batched call. Inside Muon's sharded step each rank projects what it owns before the
step's one all-gather (``distributed.ShardedStep``); after an optimizer that steps every weight on
every rank (AdamW under DDP) each rank projects a share of every stack and one all-gather per
stack gives every rank the same bits (``distributed.shared_out``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from lipschitz_lightning.constraints import (
    POWER_ITERATION_METHODS,
    RowShard,
    project_embedding,
    project_stack,
    random_start_vector,
)
from lipschitz_lightning.distributed import ShardedStep, shared_out
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
    spectral ball means nothing for them. ``fallback_count()`` counts the matrices where a guard
    replaced the method by the exact cap (see ``constraints.project_stack``), on this rank.
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
        dtype: torch.dtype | None = None,
    ):
        self.method, self.w_max, self.head_w_max, self.embed_w_max = method, w_max, head_w_max, embed_w_max
        self.coupling, self.spectral_wd, self.power_iters = coupling, spectral_wd, power_iters
        self.update_sigma_max, self.guard, self.form, self.dtype = update_sigma_max, guard, form, dtype
        self.embeddings = [w for w in weights if w.role == Role.EMBEDDING.value]
        stacks: dict[tuple, list[ConstrainedWeight]] = defaultdict(list)
        for weight in weights:
            if weight.role != Role.EMBEDDING.value and weight.param.ndim == 2:
                stacks[(tuple(weight.param.shape), weight.param.device, weight.param.dtype)].append(weight)
        self.stacks = list(stacks.values())
        self.power_states: dict[str, Tensor] = {}
        # guards decided on the host are counted on the host, those decided on the device stay there
        # until read: counting never makes a step wait for the device
        self._fallbacks_host = 0
        self._fallbacks_device: Tensor | None = None
        # the weights whose power vectors this rank keeps up to date (None: all of them)
        self.owned: set[str] | None = None

    def cap(self, weight: ConstrainedWeight) -> float:
        return self.head_w_max if weight.role == Role.HEAD.value else self.w_max

    def fallback_count(self) -> int:
        """The guards' fallbacks so far on this rank (reads the device: call it when logging)."""
        device = 0 if self._fallbacks_device is None else int(self._fallbacks_device)
        return self._fallbacks_host + device

    def restore_fallbacks(self, count: int) -> None:
        self._fallbacks_host, self._fallbacks_device = int(count), None

    def _count(self, fell_back: Tensor) -> None:
        if fell_back.device.type == "cpu":
            self._fallbacks_host += int(fell_back.numpy().sum())
        else:
            total = fell_back.sum()
            self._fallbacks_device = total if self._fallbacks_device is None else self._fallbacks_device + total

    def _power_states(self, stack: list[ConstrainedWeight], shape: tuple[int, ...] | None = None) -> Tensor | None:
        if self.method not in POWER_ITERATION_METHODS:
            return None
        states = []
        for weight in stack:
            state = self.power_states.get(weight.name)
            if state is None:
                state = random_start_vector(weight.param.float() if shape is None else weight.param.new_empty(shape, dtype=torch.float32))
            states.append(state.to(weight.param.device, torch.float32))
        return torch.stack(states)

    def _project(self, stack: list[ConstrainedWeight], W: Tensor, states: Tensor | None, shard: RowShard | None = None) -> tuple[Tensor, Tensor]:
        if not stack:  # a rank's empty share
            return W, torch.zeros(0, dtype=torch.bool)
        lr_t, wd_eff = zip(*(step_coefficients(weight.group) for weight in stack))
        return project_stack(
            W, self.method, w_max=tuple(self.cap(weight) for weight in stack), lr_t=lr_t, wd_eff=wd_eff,
            spectral_wd=self.spectral_wd, coupling=self.coupling, update_sigma_max=self.update_sigma_max,
            power_iters=self.power_iters, power_state=states, guard=self.guard,
            step_bounded=tuple(weight.step_bounded for weight in stack), form=self.form, dtype=self.dtype, shard=shard,
        )

    @torch.no_grad()
    def project(self, sharded: ShardedStep | None = None) -> None:
        """Every weight back into its ball. With ``sharded`` (inside a sharded optimizer step), only
        the weights, or rows of split matrices, this rank owns: the step's all-gather shares them."""
        if self.method == "none":  # the unconstrained baseline: decay is its only regulariser
            return
        if sharded is not None:
            self._project_owned(sharded)
            return
        for weight in self.embeddings:
            weight.param.copy_(project_embedding(weight.param, self.embed_w_max))
        for stack in self.stacks:
            W = stack_of([weight.param.float() for weight in stack])
            states = self._power_states(stack)

            def compute(rows: slice) -> tuple[Tensor, ...]:
                state = None if states is None else states[rows].clone()
                projected, fell_back = self._project(stack[rows], W[rows], state)
                self._count(fell_back)  # each rank counts the matrices it computed
                return (projected,) + (() if state is None else (state,))

            projected, *new_states = shared_out(len(stack), compute)
            for weight, value in zip(stack, projected):
                weight.param.copy_(value)
            if new_states:
                for weight, state in zip(stack, new_states[0]):
                    self.power_states[weight.name] = state

    def power_states_kept(self) -> dict[str, Tensor]:
        """The power-iteration vectors this rank keeps up to date (on the CPU, for a checkpoint)."""
        return {name: state.cpu() for name, state in self.power_states.items() if self.owned is None or name in self.owned}

    def _project_owned(self, sharded: ShardedStep) -> None:
        self.owned = set()
        for weight in self.embeddings:
            part = sharded.part(weight.param)
            if part is not False:  # token vectors are rows: a split table projects row by row
                rows = weight.param if part is None else weight.param[part]
                rows.copy_(project_embedding(rows, self.embed_w_max))
        split = []
        for stack in self.stacks:
            mine = []
            for weight in stack:
                part = sharded.part(weight.param)
                if part is None:
                    mine.append(weight)
                    self.owned.add(weight.name)
                elif part is not False:
                    split.append((weight, part))
                    if sharded.rank == 0:  # the same on every rank: rank 0 saves it
                        self.owned.add(weight.name)
            if mine:
                states = self._power_states(mine)
                projected, fell_back = self._project(mine, stack_of([weight.param.float() for weight in mine]), states)
                self._count(fell_back)
                for index, weight in enumerate(mine):
                    weight.param.copy_(projected[index])
                    if states is not None:
                        self.power_states[weight.name] = states[index]
        # every rank holds rows (maybe none) of every split matrix and sums their Gram matrices,
        # in the same order on every rank; the power vectors live on the small side, the same on all
        for weight, rows in sorted(split, key=lambda item: sharded.index(item[0].param)):
            states = self._power_states([weight], tuple(weight.param.shape))
            piece = weight.param[rows]
            projected, fell_back = self._project([weight], piece.float().unsqueeze(0), states, sharded.row_shard(weight.param))
            if sharded.rank == 0:  # every rank takes the same decision: count it once
                self._count(fell_back)
            piece.copy_(projected[0])
            if states is not None:
                self.power_states[weight.name] = states[0]

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
