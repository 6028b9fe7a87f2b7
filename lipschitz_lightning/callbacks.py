"""Lightning glue: the constraint callback and the norm / certified-bound monitor.

The math lives in ``constraints`` and ``lipschitz``; this file only decides when it runs.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lipschitz_lightning.constraints import (
    COUPLINGS,
    LINEAR_METHODS,
    POWER_ITERATION_METHODS,
    ns_max_singular_value,
    project_embedding,
    project_linear,
    random_start_vector,
)
from lipschitz_lightning.lipschitz import rms_norm
from lipschitz_lightning.optim.roles import Role, step_coefficients


class WeightConstraint(Callback):
    """Projects every weight back into its norm ball after every optimizer step (SPEC §3 step 4).

    It hooks the optimizer's own ``step`` (``register_step_post_hook``), so it runs exactly once
    per optimizer step whatever the gradient accumulation, precision plugin or strategy, and it
    reads the ``lr`` and weight decay of the step that just happened from the parameter groups
    (the LR scheduler moves on only after the hook).
    """

    def __init__(
        self,
        method: str,
        w_max: float = 1.0,
        coupling: str = "exact",
        spectral_wd: float = 0.0,
        head_w_max: float | None = None,
        embed_w_max: float = 1.0,
        power_iters: int = 16,
    ):
        if method not in LINEAR_METHODS:
            raise ValueError(f"constraint.method must be one of {sorted(LINEAR_METHODS)}, got {method!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"constraint.coupling must be one of {list(COUPLINGS)}, got {coupling!r}")
        self.method, self.w_max, self.coupling, self.spectral_wd = method, w_max, coupling, spectral_wd
        self.head_w_max = w_max if head_w_max is None else head_w_max
        self.embed_w_max, self.power_iters = embed_w_max, power_iters
        self.steps_applied = 0
        # persistent power-iteration vectors: warm starts converge, and every DDP rank holds the same
        self.power_states: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._warn_if_step_unbounded(optimizer)
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if trainer.global_step == 0:
            self.scale_into_ball(trainer.optimizers)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict:
        return {"steps_applied": self.steps_applied, "power_states": {k: v.cpu() for k, v in self.power_states.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_applied = state_dict["steps_applied"]
        self.power_states = dict(state_dict["power_states"])

    # ---------------------------------------------------------------- the projection

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _cap(self, role: str) -> float:
        return self.head_w_max if role == Role.HEAD.value else self.w_max

    def _warn_if_step_unbounded(self, optimizer: torch.optim.Optimizer) -> None:
        if self.method == "spectral_soft_cap" and not hasattr(optimizer, "ns_coefficients"):
            warnings.warn(
                f"{type(optimizer).__name__}'s step is not spectrally bounded, so spectral_soft_cap cannot "
                f"guarantee ||W||_rms <= w_max: the coupling assumes a step of spectral norm lr * t "
                f"(only Muon's step has one). Use svd_cap or spectral_normalize for a hard guarantee.",
                stacklevel=2,
            )

    def _update_sigma_max(self, optimizer: torch.optim.Optimizer) -> float:
        coefficients = getattr(optimizer, "ns_coefficients", None)
        return ns_max_singular_value(coefficients) if coefficients is not None else 1.0

    def _power_state(self, name: str, W: torch.Tensor) -> torch.Tensor | None:
        if self.method not in POWER_ITERATION_METHODS:
            return None
        state = self.power_states.get(name)
        if state is None:
            state = random_start_vector(W)
        elif state.device != W.device:
            state = state.to(W.device)
        self.power_states[name] = state
        return state

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.project(optimizer)

    @torch.no_grad()
    def project(self, optimizer: torch.optim.Optimizer) -> None:
        """Project every weight of ``optimizer`` after the step it just took (usable without a Trainer)."""
        if self.method == "none":
            self.steps_applied += 1
            return
        sigma_max = self._update_sigma_max(optimizer)
        for group in optimizer.param_groups:
            lr_t, wd_eff = step_coefficients(group)
            role = group.get("role", Role.HIDDEN.value)
            for index, W in enumerate(group["params"]):
                name = f"{group.get('name', id(group))}.{index}"
                if role == Role.EMBEDDING.value:
                    W.copy_(project_embedding(W, self.embed_w_max))
                    continue
                W32 = W.float()
                W.copy_(
                    project_linear(
                        W32,
                        self.method,
                        w_max=self._cap(role),
                        lr_t=lr_t,
                        wd_eff=wd_eff,
                        spectral_wd=self.spectral_wd,
                        coupling=self.coupling,
                        update_sigma_max=sigma_max,
                        power_iters=self.power_iters,
                        power_state=self._power_state(name, W32),
                    )
                )
        self.steps_applied += 1

    @torch.no_grad()
    def scale_into_ball(self, optimizers) -> None:
        """Start inside the ball: a layer initialised above its cap is scaled down to it once."""
        if self.method in ("none", "spectral_weight_decay"):
            return
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                role = group.get("role", Role.HIDDEN.value)
                for W in group["params"]:
                    if role == Role.EMBEDDING.value:
                        W.copy_(project_embedding(W, self.embed_w_max))
                        continue
                    norm = rms_norm(W)
                    if norm > self._cap(role):
                        W.mul_(self._cap(role) / norm)


class LipschitzMonitor(Callback):
    """Logs every layer's exact RMS->RMS norm and the certified Lipschitz bound at every validation."""

    def __init__(self) -> None:
        self.last_validated_step: int | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        net = pl_module.net
        norms = net.layer_norms()
        pl_module.log_dict({f"norm/{name}": value for name, value in norms.items()}, sync_dist=False)
        pl_module.log("lipschitz/bound", net.certified_bound(norms), sync_dist=False, prog_bar=True)
        if hasattr(net, "paper_formula_bound"):
            # SPEC §7's formula, for comparison with the paper's numbers: not a certificate
            pl_module.log("lipschitz/bound_paper_formula", net.paper_formula_bound(norms), sync_dist=False)
        self.last_validated_step = trainer.global_step
