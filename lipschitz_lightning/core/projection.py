"""A constraint applied to a whole model (SPEC §3 step 4, §6): every weight, after every optimizer
step.

Pure torch (``torch.distributed`` where a process group exists), no Lightning. A ``Projection``
applies one ``core.constraints.Constraint`` (built from ``conf/constraint/*.yaml``) and owns the
state that needs (the power-iteration vectors, the guards' fallback count). ``attach`` hooks every
optimizer's own ``step`` (``register_step_post_hook``), so the projection runs exactly once per
optimizer step, whoever calls ``step``: Lightning's automatic or manual optimization (the
``lit.constraint.WeightConstraint`` callback attaches it), gradient accumulation, a mixed-precision
scaler (a step it skips never calls ``step``, so nothing is projected), or a plain loop::

    projection = Projection(SpectralSoftCap(w_max=6.0))
    projection.attach([optimizer], net.param_specs())   # the weights, and how each optimizer steps them
    projection.scale_into_ball()                         # once, before the first step
    for x, y in batches:
        ...
        optimizer.step()                                 # the constraint runs right after, in its hook

At NanoGPT scale a per-parameter loop is the wrong shape: 73 matrices, most of them 768x768,
projected one by one on every one of 8 GPUs. Here matrices of one shape form one stack and go
through one batched call. An optimizer that shards its step across ranks (Muon under DDP) runs the
projection inside the step, on the weights each rank owns, before the step's one all-gather
(``core.sharding.ShardedStep``); after an optimizer that steps every weight on every rank (AdamW
under DDP) each rank projects a share of every stack and one all-gather per stack gives every rank
the same bits (``core.sharding.shared_out``).

What a constraint needs from an optimizer is declared, not guessed: ``StepBound`` (the spectral
norm of its step per unit ``lr * t``, which the soft cap's coupling relies on) and
``ShardsItsStep``; what it needs from a weight is the parameter group (``roles.ParamGroup``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lipschitz_lightning.core.bounds import rms_norm
from lipschitz_lightning.core.constraints import (
    Constraint,
    SpectralSoftCap,
    StackStep,
    project_embedding,
)
from lipschitz_lightning.core.linalg import RowShard, layer_scale, random_start_vector
from lipschitz_lightning.core.roles import ParamGroup, ParamSpec, Role, step_coefficients
from lipschitz_lightning.core.sharding import (
    ShardedStep,
    ShardPlan,
    rank_and_world,
    shared_out,
)
from lipschitz_lightning.core.sharding import stack as stack_of
from lipschitz_lightning.errors import ConfigError


@runtime_checkable
class StepBound(Protocol):
    """An optimizer whose step direction has a known largest spectral norm."""

    def step_spectral_bound(self, group: ParamGroup) -> float | None:
        """The largest spectral norm of ``group``'s step direction per unit ``lr * t``, in ``W / scale``
        units, or None where the step has no such bound (an Adam-stepped weight)."""


@runtime_checkable
class ShardsItsStep(Protocol):
    """An optimizer that splits its step across DDP ranks and runs a projection inside it."""

    shards_its_step: bool
    shard_plan: ShardPlan | None  # which rank owns which piece, once a sharded step has run

    def attach_projection(self, project: Callable[[ShardedStep], None]) -> None: ...


@dataclass(frozen=True)
class ConstrainedWeight:
    name: str
    param: Tensor
    role: str
    group: ParamGroup  # the optimizer's group: the step's lr and weight decay are read from it
    step_bound: float | None  # StepBound.step_spectral_bound of the group (None: not bounded)


def constrained_weights(optimizer, specs: Iterable[ParamSpec] | None = None) -> list[ConstrainedWeight]:
    """Every parameter of ``optimizer`` that ``specs`` describes (None: the roles and names that its
    groups carry, ``roles.param_groups``'s keys), with its name, role and the optimizer's step bound.
    A parameter ``specs`` leaves out is not constrained."""
    described = None if specs is None else {id(spec.param): spec for spec in specs}
    weights = []
    for group_index, group in enumerate(optimizer.param_groups):
        bound = optimizer.step_spectral_bound(group) if isinstance(optimizer, StepBound) else None
        for index, param in enumerate(group["params"]):
            if described is not None:
                spec = described.get(id(param))
                if spec is not None:
                    weights.append(ConstrainedWeight(spec.name, param, spec.role.value, group, bound))
                continue
            role = group.get("role", Role.HIDDEN.value)
            name = group.get("name") if len(group["params"]) == 1 and "name" in group else f"group{group_index}.{index}"
            weights.append(ConstrainedWeight(name, param, role, group, bound))
    return weights


@dataclass
class _Attached:
    """What one optimizer's step moves: its embeddings and its matrices in stacks of one shape."""

    embeddings: list[ConstrainedWeight]
    stacks: list[list[ConstrainedWeight]]


class Projection:
    """One ``Constraint`` for every weight of some optimizers.

    Matrices are projected in stacks of one shape (the head with the constraint's ``head_w_max``),
    embeddings (rows are token vectors) pulled back to RMS at most ``embed_w_max``; parameters that
    are neither (a bias, a gain) are left alone, since a spectral ball means nothing for them. After
    each optimizer's step the weights that optimizer stepped are projected, with the ``lr`` and decay
    of that step. ``fallback_count()`` counts the matrices where a guard replaced the method by the
    exact cap, on this rank.
    """

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.embeddings: list[ConstrainedWeight] = []
        self.stacks: list[list[ConstrainedWeight]] = []
        self._attached: dict[int, _Attached] = {}  # by id(optimizer)
        self._hooks: list = []
        self.power_states: dict[str, Tensor] = {}
        self.steps_applied = 0
        # guards decided on the host are counted on the host, those decided on the device stay there
        # until read: counting never makes a step wait for the device
        self._fallbacks_host = 0
        self._fallbacks_device: Tensor | None = None
        # the weights whose power vectors this rank keeps up to date (None: all of them)
        self.owned: set[str] | None = None

    # ------------------------------------------------------------------ attaching

    def attach(self, optimizers, specs: Iterable[ParamSpec] | None = None) -> None:
        """Take the weights of ``optimizers`` that ``specs`` describes (None: what their groups say,
        ``constrained_weights``) and hook each optimizer's ``step``: right after it, the weights it
        stepped are projected. An optimizer that shards its step across ranks runs the projection
        inside its step instead, before it shares the weights. ``detach`` removes the hooks."""
        self.detach()
        optimizers = list(optimizers)
        specs = None if specs is None else list(specs)
        per_optimizer = [constrained_weights(optimizer, specs) for optimizer in optimizers]
        weights = [weight for owned in per_optimizer for weight in owned]
        constraint = self.constraint
        if constraint.active:
            for weight in weights:
                if weight.param.dtype not in (torch.float32, torch.float64):
                    raise ConfigError(
                        f"constraint={constraint.name} needs float32 or float64 weights, got {weight.param.dtype}: rounding a "
                        f"projected weight to {weight.param.dtype} can push it past w_max (use trainer.precision=bf16-mixed)"
                    )
        if isinstance(constraint, SpectralSoftCap) and any(w.step_bound is None and w.role != Role.EMBEDDING.value for w in weights):
            warnings.warn(
                "an optimizer's step is not spectrally bounded (Adam's), so the soft cap's coupling (which assumes a step of "
                "spectral norm lr * t, as Muon's) does not bound it: after every step each matrix's exact norm is checked, "
                "and one the step took past the coupling's range gets the exact cap instead (counted in "
                "constraint/guard_fallbacks). svd_cap or spectral_normalize cap directly.",
                stacklevel=2,
            )
        self._attached = {}
        for optimizer, owned in zip(optimizers, per_optimizer):
            attached = self._attached[id(optimizer)] = _split(owned)
            if isinstance(optimizer, ShardsItsStep) and optimizer.shards_its_step:
                optimizer.attach_projection(lambda sharded, attached=attached: self.project(sharded, attached))
            else:
                self._hooks.append(optimizer.register_step_post_hook(lambda stepped, args, kwargs: self.after_step(stepped)))
        everything = _split(weights)
        self.embeddings, self.stacks = everything.embeddings, everything.stacks

    def detach(self) -> None:
        """Remove the hooks ``attach`` put on the optimizers' steps."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def after_step(self, optimizer=None) -> None:
        """What runs right after an optimizer's ``step()`` (its hook): the projection of the weights
        ``optimizer`` steps (None: of every attached optimizer)."""
        if optimizer is None:
            self.project()
        elif id(optimizer) in self._attached:
            self.project(attached=self._attached[id(optimizer)])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The power vectors, the fallback count and the steps applied. Under DDP a collective (every
        rank must call it, as Lightning's checkpointing does): each rank keeps the power vectors and
        counts the fallbacks of the weights it projects."""
        states, fallbacks = self.power_states_kept(), self.fallback_count()
        rank, world = rank_and_world()
        if world > 1:
            every_rank: list = [None] * world
            torch.distributed.all_gather_object(every_rank, (states, fallbacks))
            states = {name: state for kept, _ in every_rank for name, state in kept.items()}
            fallbacks = sum(count for _, count in every_rank)
        return {"steps_applied": self.steps_applied, "power_states": states, "fallbacks": fallbacks}

    def load_state_dict(self, state: dict) -> None:
        self.steps_applied = state["steps_applied"]
        self.power_states = dict(state["power_states"])
        # the run's total so far, kept by rank 0 (every rank's own count adds to it)
        self._fallbacks_host, self._fallbacks_device = (int(state.get("fallbacks", 0)) if rank_and_world()[0] == 0 else 0), None

    def cap(self, weight: ConstrainedWeight) -> float:
        return self.constraint.cap(head=weight.role == Role.HEAD.value)

    def fallback_count(self) -> int:
        """The guards' fallbacks so far on this rank (reads the device: call it when logging)."""
        device = 0 if self._fallbacks_device is None else int(self._fallbacks_device)
        return self._fallbacks_host + device

    def _count(self, fell_back: Tensor) -> None:
        if fell_back.device.type == "cpu":
            self._fallbacks_host += int(fell_back.numpy().sum())
        else:
            total = fell_back.sum()
            self._fallbacks_device = total if self._fallbacks_device is None else self._fallbacks_device + total

    def _power_states(self, stack: list[ConstrainedWeight], shape: tuple[int, ...] | None = None) -> Tensor | None:
        if not self.constraint.power_iteration:
            return None
        states = []
        for weight in stack:
            state = self.power_states.get(weight.name)
            if state is None:
                state = random_start_vector(weight.param.float() if shape is None else weight.param.new_empty(shape, dtype=torch.float32))
            states.append(state.to(weight.param.device, torch.float32))
        return torch.stack(states)

    def _project(self, stack: list[ConstrainedWeight], W: Tensor, states: Tensor | None, shard: RowShard | None = None) -> tuple[Tensor, Tensor]:
        """The constraint on ``W``, the stack of ``stack``'s weights (or their rows: ``shard``), after
        the step their groups just took; and per matrix whether a guard fell back."""
        lr_t, wd_eff = zip(*(step_coefficients(weight.group) for weight in stack)) if stack else ((), ())
        step = StackStep(
            caps=tuple(self.cap(weight) for weight in stack), lr_t=lr_t, wd_eff=wd_eff,
            step_bound=tuple(weight.step_bound for weight in stack),
            scale=layer_scale(W if shard is None else shard.shape), power_state=states, shard=shard,
            fell_back=torch.zeros(len(stack), dtype=torch.bool),
        )
        if not stack:  # a rank's empty share
            return W, step.fell_back
        return self.constraint(W, step), step.fell_back

    # ------------------------------------------------------------------ projecting

    @torch.no_grad()
    def project(self, sharded: ShardedStep | None = None, attached: _Attached | None = None) -> None:
        """The weights of ``attached`` (one optimizer's; None: every attached weight) back into their
        ball. With ``sharded`` (inside a sharded optimizer step), only the weights, or rows of split
        matrices, this rank owns: the step's all-gather shares them."""
        self.steps_applied += 1
        if not self.constraint.active:  # the unconstrained baseline: decay is its only regulariser
            return
        attached = attached or _Attached(self.embeddings, self.stacks)
        if sharded is not None:
            self._project_owned(sharded, attached)
            return
        for weight in attached.embeddings:
            weight.param.copy_(project_embedding(weight.param, self.constraint.embed_w_max))
        for stack in attached.stacks:
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

    def _project_owned(self, sharded: ShardedStep, attached: _Attached) -> None:
        self.owned = set()
        for weight in attached.embeddings:
            part = sharded.part(weight.param)
            if part is not False:  # token vectors are rows: a split table projects row by row
                rows = weight.param if part is None else weight.param[part]
                rows.copy_(project_embedding(rows, self.constraint.embed_w_max))
        split = []
        for stack in attached.stacks:
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
        if not self.constraint.starts_in_ball:
            return
        for weight in self.embeddings:
            weight.param.copy_(project_embedding(weight.param, self.constraint.embed_w_max))
        for stack in self.stacks:
            for weight in stack:
                norm = rms_norm(weight.param)
                if norm > self.cap(weight):
                    weight.param.mul_(self.cap(weight) / norm)


def _split(weights: list[ConstrainedWeight]) -> _Attached:
    """Embeddings apart, matrices in stacks of one shape, device and dtype (one batched call each)."""
    embeddings = [w for w in weights if w.role == Role.EMBEDDING.value]
    stacks: dict[tuple, list[ConstrainedWeight]] = defaultdict(list)
    for weight in weights:
        if weight.role != Role.EMBEDDING.value and weight.param.ndim == 2:
            stacks[(tuple(weight.param.shape), weight.param.device, weight.param.dtype)].append(weight)
    return _Attached(embeddings, list(stacks.values()))
