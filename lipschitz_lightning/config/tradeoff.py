"""What a run is on the tradeoff plot: its optimizer, its constraint and the knob it was swept on.

Read from a run's resolved config (a plain dict), so the W&B tags of a live run and the report
of a finished sweep name runs identically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunLabel:
    optimizer: str  # "muon", "adamw"
    constraint: str  # the constraint's option name, or "weight_decay" for an unconstrained run that decays
    w_max: float | None  # None where the method has no cap
    weight_decay: float
    lr: float

    @property
    def pair(self) -> str:
        return f"{self.optimizer} + {self.constraint}"

    def tags(self) -> list[str]:
        tags = [f"optimizer:{self.optimizer}", f"constraint:{self.constraint}"]
        return tags + ([f"w_max:{self.w_max:g}"] if self.w_max is not None else [])


UNCAPPED_METHODS = ("none", "spectral_weight_decay")


def constraint_name(constraint: Mapping) -> str:
    """A constraint config's option name (``conf/constraint/<name>.yaml``), read from its ``_target_``
    without importing it (a summary read from a file must not run code): the class's default
    ``Constraint.name``, its name in snake case; the unconstrained baseline's class, ``NoConstraint``,
    is the option ``none``. Configs written before constraints were classes say ``method``."""
    if "method" in constraint:
        return constraint["method"]
    class_name = str(constraint["_target_"]).rsplit(".", 1)[-1]
    return "none" if class_name == "NoConstraint" else re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def describe(config: dict[str, Any]) -> RunLabel:
    optimizer = config["optimizer"]
    constraint = config["constraint"]
    method = constraint_name(constraint)
    weight_decay = float(optimizer.get("weight_decay") or 0.0)
    w_max = None if method in UNCAPPED_METHODS else float(constraint["w_max"])
    if method == "none" and weight_decay > 0:
        # the paper's "weight decay" constraint: decoupled decay is the only regulariser
        method = "weight_decay"
    return RunLabel(
        optimizer=optimizer["_target_"].rsplit(".", 1)[-1].lower(),
        constraint=method,
        w_max=w_max,
        weight_decay=weight_decay,
        lr=float(optimizer["lr"]),
    )
