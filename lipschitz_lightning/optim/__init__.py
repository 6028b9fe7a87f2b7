"""Optimizers (Muon, AdamW), parameter roles and target norms."""

from lipschitz_lightning.core.roles import (
    ParamSpec,
    Role,
    gpt_target_norms,
    mlp_target_norms,
    param_groups,
    with_target_weight_decay,
)
from lipschitz_lightning.optim.adamw import AdamW, ReferenceAdamW
from lipschitz_lightning.optim.muon import Muon
from lipschitz_lightning.optim.schedules import StableCooldown

__all__ = ["AdamW", "Muon", "ParamSpec", "ReferenceAdamW", "Role", "StableCooldown", "gpt_target_norms", "mlp_target_norms", "param_groups", "with_target_weight_decay"]
