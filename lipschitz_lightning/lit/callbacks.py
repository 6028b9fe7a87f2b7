"""Lightning glue: speed, rank agreement, checkpoints at a cadence and on preemption, the final
validation, the progress bar. (The constraint, and the norms and bound it logs: ``lit.constraint``.)
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lipschitz_lightning.core.types import PositiveInt
from lipschitz_lightning.errors import TrainingDiverged


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


class FinalValidation(Callback):
    """Validate, and so checkpoint, the last step of every run.

    Lightning validates every ``val_check_interval`` steps only: a 250-step run with an interval of
    100 would end with its last 50 steps neither validated nor in ``last.ckpt``, and a run shorter
    than the interval would write no checkpoint at all. Asking the loop to stop at the last step
    makes Lightning validate there (its early-stopping path), and the ModelCheckpoints save.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counted in optimizer steps out of ``trainer.max_steps``.

    The training batches are an endless stream, so Lightning's per-epoch bar has no total. This one
    shows ``step k/max_steps`` and, from the first validation on, the latest ``val/acc`` and
    ``lipschitz/bound`` (both logged with ``prog_bar=True``).
    """

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)  # not called when a run resumes mid-epoch
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description("step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        refresh = step % max(self.refresh_rate, 1) == 0 or step >= trainer.max_steps
        if self.train_progress_bar is not None and refresh and not self.train_progress_bar.disable:
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: "" for every run here
        return metrics
