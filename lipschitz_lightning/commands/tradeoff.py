"""What a run is on the tradeoff plot: its optimizer, its constraint and the knob it was swept on.

Read from a run's resolved config (a plain dict), so the W&B tags of a live run and the report
of a finished sweep name runs identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunLabel:
    optimizer: str  # "muon", "adamw"
    constraint: str  # constraint.method, or "weight_decay" for an unconstrained run that decays
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


def describe(config: dict[str, Any]) -> RunLabel:
    optimizer = config["optimizer"]
    constraint = config["constraint"]
    method = constraint["method"]
    weight_decay = float(optimizer.get("weight_decay") or 0.0)
    if method == "none" and weight_decay > 0:
        # the paper's "weight decay" constraint: decoupled decay is the only regulariser
        method = "weight_decay"
    w_max = None if constraint["method"] in UNCAPPED_METHODS else float(constraint["w_max"])
    return RunLabel(
        optimizer=optimizer["_target_"].rsplit(".", 1)[-1].lower(),
        constraint=method,
        w_max=w_max,
        weight_decay=weight_decay,
        lr=float(optimizer["lr"]),
    )
