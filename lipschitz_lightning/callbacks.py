"""Lightning glue: the constraint callback and the norm / certified-bound monitor.

The math lives in ``constraints`` and ``lipschitz``; this file only decides when it runs.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lipschitz_lightning.constraints import COUPLINGS, LINEAR_METHODS, POLYNOMIAL_FORMS, PROJECTION_DTYPES, ns_max_singular_value
from lipschitz_lightning.distributed import rank_and_world
from lipschitz_lightning.errors import ConfigError, TrainingDiverged
from lipschitz_lightning.projection import Projector, constrained_weights
from lipschitz_lightning.schema import Positive, PositiveInt, UnitInterval


class WeightConstraint(Callback):
    """Projects every weight back into its norm ball after every optimizer step (SPEC §3 step 4).

    It hooks the optimizer's own ``step`` (``register_step_post_hook``), so it runs exactly once
    per optimizer step whatever the gradient accumulation, precision plugin or strategy, and it
    reads the ``lr`` and weight decay of the step that just happened from the parameter groups
    (the LR scheduler moves on only after the hook). The projection itself is a
    ``projection.Projector``: batched by shape, shared out across DDP ranks. An optimizer that
    shards its step across ranks (Muon under DDP) runs the projection itself, inside the step, on
    the weights each rank owns (``attach_projection``): no hook, and no second all-gather.
    """

    def __init__(
        self,
        method: Literal[tuple(LINEAR_METHODS)],
        w_max: Positive = 1.0,
        coupling: Literal[COUPLINGS] = "exact",
        spectral_wd: UnitInterval = 0.0,
        head_w_max: Positive | None = None,
        embed_w_max: Positive = 1.0,
        power_iters: PositiveInt = 16,
        polynomial_form: Literal[POLYNOMIAL_FORMS] = "auto",
        dtype: Literal[PROJECTION_DTYPES] = "float32",
    ):
        if method not in LINEAR_METHODS:
            raise ValueError(f"constraint.method must be one of {sorted(LINEAR_METHODS)}, got {method!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"constraint.coupling must be one of {list(COUPLINGS)}, got {coupling!r}")
        self.method, self.w_max, self.coupling, self.spectral_wd = method, w_max, coupling, spectral_wd
        self.head_w_max = w_max if head_w_max is None else head_w_max
        self.embed_w_max, self.power_iters, self.polynomial_form = embed_w_max, power_iters, polynomial_form
        self.dtype = dtype
        self.steps_applied = 0
        self.projector: Projector | None = None
        self._restored: dict | None = None  # projector state from a checkpoint, applied once it exists
        self._hooks: list = []

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.projector = self.build_projector(trainer.optimizers)
        for optimizer in trainer.optimizers:
            self._warn_if_step_unbounded(optimizer)
            if getattr(optimizer, "shards_its_step", False):
                optimizer.attach_projection(self._project_shards)
            else:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if trainer.global_step == 0:
            self.projector.scale_into_ball()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict:
        """Under DDP a collective (Lightning calls it on every rank): each rank keeps the power
        vectors and counts the fallbacks of the weights it projects."""
        projector = self.projector
        states = projector.power_states_kept() if projector else {}
        fallbacks = projector.fallback_count() if projector else 0
        rank, world = rank_and_world()
        if world > 1:
            every_rank: list = [None] * world
            torch.distributed.all_gather_object(every_rank, (states, fallbacks))
            states = {name: state for kept, _ in every_rank for name, state in kept.items()}
            fallbacks = sum(count for _, count in every_rank)
        return {"steps_applied": self.steps_applied, "power_states": states, "fallbacks": fallbacks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_applied = state_dict["steps_applied"]
        self._restored = state_dict

    # ---------------------------------------------------------------- the projection

    def build_projector(self, optimizers) -> Projector:
        """The projector over every weight of ``optimizers`` (usable without a Trainer)."""
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if self.method != "none" and param.dtype not in (torch.float32, torch.float64):
                        raise ConfigError(
                            f"constraint={self.method} needs float32 or float64 weights, got {param.dtype}: rounding a "
                            f"projected weight to {param.dtype} can push it past w_max (use trainer.precision=bf16-mixed)"
                        )
        projector = Projector(
            constrained_weights(optimizers), self.method, w_max=self.w_max, head_w_max=self.head_w_max,
            embed_w_max=self.embed_w_max, coupling=self.coupling, spectral_wd=self.spectral_wd,
            power_iters=self.power_iters, update_sigma_max=max(update_sigma_max(o) for o in optimizers),
            form=self.polynomial_form, dtype=None if self.dtype == "float32" else getattr(torch, self.dtype),
        )
        if self._restored is not None:
            projector.power_states = dict(self._restored["power_states"])
            # the run's total so far, kept by rank 0 (every rank's own count adds to it)
            projector.restore_fallbacks(self._restored.get("fallbacks", 0) if rank_and_world()[0] == 0 else 0)
            self._restored = None
        return projector

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _warn_if_step_unbounded(self, optimizer: torch.optim.Optimizer) -> None:
        if self.method == "spectral_soft_cap" and not hasattr(optimizer, "ns_coefficients"):
            warnings.warn(
                f"{type(optimizer).__name__}'s step is not spectrally bounded, so the soft cap's coupling "
                f"(which assumes a step of spectral norm lr * t, as Muon's) does not bound it: after every step "
                f"each matrix's exact norm is checked, and one the step took past the coupling's range gets the "
                f"exact cap instead (counted in constraint/guard_fallbacks). svd_cap or spectral_normalize cap directly.",
                stacklevel=2,
            )

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.project(optimizer)

    def _project_shards(self, sharded) -> None:
        self.projector.project(sharded)
        self.steps_applied += 1

    @torch.no_grad()
    def project(self, optimizer: torch.optim.Optimizer) -> None:
        """Project every weight of ``optimizer`` after the step it just took (usable without a Trainer)."""
        if self.projector is None:
            self.projector = self.build_projector([optimizer])
        self.projector.project()
        self.steps_applied += 1

    @torch.no_grad()
    def scale_into_ball(self, optimizers) -> None:
        """Start inside the ball: a layer initialised above its cap is scaled down to it once."""
        if self.projector is None:
            self.projector = self.build_projector(optimizers)
        self.projector.scale_into_ball()


def update_sigma_max(optimizer: torch.optim.Optimizer) -> float:
    """The largest spectral norm of ``optimizer``'s step direction per unit ``lr * t`` (W / scale units).

    Muon: the largest singular value its Newton-Schulz coefficients can output, plus a margin for
    rounding: 1e-4 in float32 (the tests measure below 1e-5 for either polynomial form), 5% in a
    16-bit precision (the margin the paper's NanoGPT recipe uses for bfloat16; empirical, not a
    proof). Other optimizers have no such bound: 1.0, the guard checks their matrices exactly.
    """
    coefficients = getattr(optimizer, "ns_coefficients", None)
    if coefficients is None:
        return 1.0
    margin = 1 + 1e-4 if getattr(optimizer, "ns_dtype", torch.float32) in (torch.float32, torch.float64) else 1.05
    return ns_max_singular_value(coefficients) * margin


class LipschitzMonitor(Callback):
    """Logs every layer's exact RMS->RMS norm and the certified Lipschitz bound at every validation.

    Computed on rank 0 only: the weights are identical on every rank, and at NanoGPT scale the 73
    exact norms (one of them the 50304x768 head's) are worth computing once, not eight times.
    """

    def __init__(self) -> None:
        self.last_validated_step: int | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_validated_step = trainer.global_step
        constraint = next((c for c in trainer.callbacks if isinstance(c, WeightConstraint)), None)
        fallbacks = None
        if constraint is not None and constraint.projector is not None:
            # every rank counts the matrices it projected: summed, on every rank (a collective)
            count = torch.tensor(float(constraint.projector.fallback_count()), device=pl_module.device)
            fallbacks = float(trainer.strategy.reduce(count, reduce_op="sum"))
        if not trainer.is_global_zero:
            return
        net = pl_module.net
        norms = net.layer_norms()
        metrics = {f"norm/{name}": value for name, value in norms.items()}
        metrics["lipschitz/bound"] = net.certified_bound(norms)
        if hasattr(net, "paper_formula_bound"):
            # SPEC §7's formula, for comparison with the paper's numbers: not a certificate
            metrics["lipschitz/bound_paper_formula"] = net.paper_formula_bound(norms)
        if fallbacks is not None:
            metrics["constraint/guard_fallbacks"] = fallbacks
        pl_module.log("lipschitz/bound", metrics.pop("lipschitz/bound"), rank_zero_only=True, prog_bar=True)
        pl_module.log_dict(metrics, rank_zero_only=True)


class SpeedMonitor(Callback):
    """Logs ``speed/step_ms`` and ``speed/tokens_per_s`` (``speed/examples_per_s`` for images) over
    the steps since the last log, and ``memory/peak_gib`` on CUDA, every ``log_every_n_steps`` steps.

    The clock is read only at those steps (after a CUDA synchronisation there), so it adds no
    per-step host sync; the counted items are those of this rank times the number of ranks.
    """

    def __init__(self) -> None:
        self._since: tuple[float, int] | None = None  # (clock, step) at the last log
        self._items_per_step, self._unit = 0, "tokens"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        x = batch[0]
        tokens = x.ndim == 2 and not x.is_floating_point()
        self._unit = "tokens" if tokens else "examples"
        self._items_per_step = (x.numel() if tokens else x.shape[0]) * trainer.accumulate_grad_batches * trainer.world_size
        if self._since is None:
            self._since = (self._clock(pl_module), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._since is None or step % trainer.log_every_n_steps or step == self._since[1]:
            return
        now = self._clock(pl_module)
        seconds, steps = now - self._since[0], step - self._since[1]
        metrics = {"speed/step_ms": 1e3 * seconds / steps, f"speed/{self._unit}_per_s": self._items_per_step * steps / seconds}
        if pl_module.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._since = (now, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = None  # validation time is not training time: restart the clock

    @staticmethod
    def _clock(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()


class RankAgreement(Callback):
    """Under DDP, checks at every validation and at the end that every rank holds bit-identical
    weights, and stops the run with one clear error if not.

    Nothing in the method may differ between ranks (the projection's start vectors are seeded, the
    shared work is all-gathered), but a rank-dependent bit anywhere (a kernel, a data race) would
    let the replicas drift apart silently. The check is a hash (BLAKE2b) of every weight's bytes,
    in parameter order, so any difference shows, swapped entries included; the ranks compare their
    16-byte digests. Without DDP it does nothing.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    @staticmethod
    @torch.no_grad()
    def digest(module: torch.nn.Module) -> str:
        hasher = hashlib.blake2b(digest_size=16)
        for name, p in module.named_parameters():
            hasher.update(name.encode())
            hasher.update(p.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
        return hasher.hexdigest()

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        digests: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(digests, self.digest(pl_module.net))
        if len(set(digests)) > 1:
            raise TrainingDiverged(
                f"the {trainer.world_size} ranks hold different weights at step {trainer.global_step} "
                f"(digests {digests}): a rank-dependent computation let the replicas drift apart"
            )


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, writing at every ``every_n_validations``-th validation (by
    step, so a resumed run keeps the cadence) and always at the last step. A NanoGPT checkpoint is
    1.35 GiB: writing two at each of the recipe's 50 validations would be ~135 GiB per run."""

    def __init__(self, every_n_validations: PositiveInt = 1, **kwargs):
        super().__init__(**kwargs)
        self.every_n_validations = every_n_validations

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        interval = trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else 1
        step = trainer.global_step
        if step % (self.every_n_validations * interval) == 0 or step >= trainer.max_steps > 0:
            super().on_validation_end(trainer, pl_module)


class SaveOnPreemption(Callback):
    """A SIGTERM (a scheduler's preemption or time limit) ends the run at the next step boundary
    with a resumable ``last.ckpt`` in ``dirpath``. Lightning turns the signal into
    ``SIGTERMException`` on every rank at the same step; ``train.py`` then writes the run's summary
    as preempted and exits with status 143 (128 + SIGTERM), so that the scheduler sees a failure."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(str(Path(self.dirpath) / "last.ckpt"))
