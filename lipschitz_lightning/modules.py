"""LightningModules: thin wrappers that turn a network into a training task."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lipschitz_lightning.errors import TrainingDiverged
from lipschitz_lightning.optim.roles import param_groups


class ClassificationModule(L.LightningModule):
    """Cross-entropy classification. ``net`` provides ``param_specs()`` (roles, target norms)."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_classes: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self._unchecked_losses: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits.detach(), y)
        self._unchecked_losses.append((self.global_step, loss.detach()))
        # Logging and the finiteness check each cost a host sync (and ~1 ms of Python per
        # self.log): on accelerators do them every log_every_n_steps, not every step.
        logging_step = self.global_step % self.trainer.log_every_n_steps == 0
        if logging_step or loss.device.type == "cpu":
            self._raise_if_diverged()
        if logging_step:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", self.train_acc.compute())  # over the steps since the last log
            self.train_acc.reset()
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_train_end(self) -> None:
        self._raise_if_diverged()

    def _raise_if_diverged(self) -> None:
        if not self._unchecked_losses:
            return
        steps, losses = zip(*self._unchecked_losses)
        self._unchecked_losses.clear()
        finite = torch.isfinite(torch.stack(losses)).tolist()
        if not all(finite):
            first = finite.index(False)
            raise TrainingDiverged(f"training loss is {losses[first].item()} at step {steps[first]}: the run diverged")

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.val_loss(F.cross_entropy(logits, y, reduction="none"))
        self.val_acc(logits, y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.net.param_specs()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
