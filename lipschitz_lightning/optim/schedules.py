"""Learning-rate schedules that torch does not ship."""

from __future__ import annotations

import torch

from lipschitz_lightning.core.types import NonNegative, PositiveInt, UnitInterval


class StableCooldown(torch.optim.lr_scheduler.LambdaLR):
    """modded-nanogpt's schedule: every group's lr constant, then linear over the last
    ``cooldown_fraction`` of ``total_steps`` from 1x to ``final_factor`` x. Stepped once per
    optimizer step, like the recipe's ``get_lr(step)``."""

    def __init__(self, optimizer, total_steps: PositiveInt, cooldown_fraction: UnitInterval = 0.4, final_factor: NonNegative = 0.1):
        def factor(step: int) -> float:
            progress = step / total_steps
            if progress < 1 - cooldown_fraction:
                return 1.0
            if cooldown_fraction == 0:  # no cool-down: the last step's factor is reached at once
                return final_factor
            remaining = max(1 - progress, 0.0) / cooldown_fraction
            return remaining + (1 - remaining) * final_factor

        super().__init__(optimizer, factor)
