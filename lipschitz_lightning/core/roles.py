"""Parameter roles and target norms (SPEC §5): what the optimizer and the constraint need per weight.

A model describes its weights as ``ParamSpec`` records (``param_specs()``); ``param_groups`` turns
them into the optimizer's parameter groups, whose keys are the ``ParamGroup`` record: the one
contract between the models, the optimizers and the constraint (``projection.Projection`` reads the
step's ``lr`` and ``weight_decay`` from the group it projects). A network that declares no specs gets
them from its module types (``specs_by_module_type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypedDict

from torch import nn


class Role(str, Enum):
    HIDDEN = "hidden"  # a linear layer's (fanout, fanin) matrix
    EMBEDDING = "embedding"  # a (num_tokens, d) table whose rows are token vectors
    HEAD = "head"  # the output layer: a matrix, with its own w_max where the recipe asks for one


@dataclass(frozen=True)
class ParamSpec:
    name: str
    param: nn.Parameter
    role: Role
    target_norm: float


class ParamGroup(TypedDict, total=False):
    """An optimizer's parameter group as this project's optimizers and constraint read it."""

    params: list[nn.Parameter]  # one weight (param_groups makes one group per weight)
    name: str  # its name in the bound (q0, mlp_in1, out, embed, layers.0, ...)
    role: str  # a Role value
    target_norm: float  # t of SPEC §5
    weight_decay: float  # wd * t: the base decay premultiplied by the target norm
    lr: float  # the step's learning rate (the scheduler's)


def specs_by_module_type(module: nn.Module, names: list[str] | None = None) -> tuple[list[ParamSpec], list[str]]:
    """The weights of any network, found from its module types: an ``nn.Linear``'s weight is a matrix
    (capped in RMS->RMS units, SPEC §2), an ``nn.Embedding``'s a table of token vectors (SPEC §6.2);
    each with target norm 1. Returns the specs and the names of the parameters left alone (biases,
    gains, convolutions: no spectral ball is defined for them here).

    ``names``: constrain exactly these parameters (``module.named_parameters()`` names); a 2-D one
    that belongs to no linear layer or embedding is taken as a ``(fanout, fanin)`` matrix, any other
    shape is a ``ValueError`` naming it."""
    owner = {f"{prefix}.{name}" if prefix else name: child
             for prefix, child in module.named_modules() for name, _ in child.named_parameters(recurse=False)}
    params = dict(module.named_parameters())
    if names is not None:
        missing = [name for name in names if name not in params]
        if missing:
            raise ValueError(f"weights {missing} are not parameters of {type(module).__name__}; "
                             f"its parameters: {', '.join(params) or 'none'}")
    specs, skipped = [], []
    for name, param in params.items():
        kind = owner.get(name)
        if names is not None and name not in names:
            continue
        if isinstance(kind, nn.Embedding) and name.endswith("weight"):
            specs.append(ParamSpec(name, param, Role.EMBEDDING, 1.0))
        elif (isinstance(kind, nn.Linear) and name.endswith("weight")) or (names is not None and param.ndim == 2):
            specs.append(ParamSpec(name, param, Role.HIDDEN, 1.0))
        elif names is not None:
            raise ValueError(f"weights: {name} has shape {tuple(param.shape)}; a constraint acts on (fanout, fanin) matrices")
        else:
            skipped.append(name)
    return specs, skipped


def mlp_target_norms(num_layers: int) -> list[float]:
    """Modula's mass algebra gives every layer of an n-layer MLP the same share, ``1/n``."""
    return [1.0 / num_layers] * num_layers


def gpt_target_norms(blocks_mass: float) -> dict[str, float]:
    """Target norm per GPT role, independent of the number of blocks (``M = blocks_mass + 2``)."""
    total = blocks_mass + 2
    return {
        "embedding": 1 / total,
        "head": 1 / total,
        "qkv": blocks_mass / total,
        "attention_out": blocks_mass / (3 * total),
        "mlp_up": blocks_mass / (3 * total),
        "mlp_down": blocks_mass / (3 * total),
    }


def param_groups(specs: list[ParamSpec]) -> list[ParamGroup]:
    """One optimizer group per weight, carrying its name, role and target norm."""
    return [
        {"params": [spec.param], "name": spec.name, "role": spec.role.value, "target_norm": spec.target_norm}
        for spec in specs
    ]


def with_target_weight_decay(groups, weight_decay: float) -> list[dict]:
    """Store each group's weight decay premultiplied by its target norm.

    Every optimizer here (and ``torch.optim.AdamW``) then decays by ``lr * group["weight_decay"]``,
    which is SPEC §3's ``wd * lr * t``, and the projection reads the step's ``wd_eff`` from the
    same key. Groups without a target norm (plain parameter lists) count as ``t = 1``.
    """
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**g, "weight_decay": weight_decay * g.get("target_norm", 1.0)} for g in groups]


def step_coefficients(group: ParamGroup) -> tuple[float, float]:
    """``(lr * t, wd * lr * t)`` of the step a group just took: what the soft cap's coupling needs. A
    group of another optimizer (``torch.optim.AdamW``, SGD: no target norm) counts as ``t = 1``."""
    lr = float(group["lr"])
    return lr * group.get("target_norm", 1.0), lr * group.get("weight_decay", 0.0)


def is_matrix_role(role: str) -> bool:
    return role in (Role.HIDDEN.value, Role.HEAD.value)
