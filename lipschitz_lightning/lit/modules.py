"""LightningModules: thin wrappers that turn a network into a training task."""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable
from typing import Annotated

import annotated_types as at
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lipschitz_lightning.core.losses import CrossEntropy
from lipschitz_lightning.core.roles import param_groups
from lipschitz_lightning.core.types import PositiveInt, Radius, parse_radius
from lipschitz_lightning.errors import TrainingDiverged
from lipschitz_lightning.lit.checkpoints import network_record
from lipschitz_lightning.robustness.certified import PairCertificate
from lipschitz_lightning.step import batch_loss, flatten_positions, training_margin

# Mixed precisions whose forward runs in 16 bits: margins of 16-bit logits certify nothing, so the
# training loop's count of points past the margin is logged as an estimate there
SIXTEEN_BIT_FORWARD = ("16-mixed", "bf16-mixed")


class CorrectFraction(Metric):
    """``correct / total`` summed over updates and ranks: micro accuracy from counts, for a model
    whose predictions are never all in memory at once (``MulticlassAccuracy`` wants them)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, total: int) -> None:
        self.correct += correct
        self.total += total

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.float()


class LossSpikes:
    """Counts loss spikes: steps whose training loss exceeds ``factor`` times the median of the
    ``window`` steps before it (once at least ``window // 2`` of them are there)."""

    def __init__(self, factor: float = 1.5, window: int = 50):
        self.factor, self.recent, self.count = factor, collections.deque(maxlen=window), 0

    def update(self, losses: list[float]) -> None:
        for value in losses:
            if len(self.recent) >= self.recent.maxlen // 2 and value > self.factor * statistics.median(self.recent):
                self.count += 1
            self.recent.append(value)


class ClassificationModule(L.LightningModule):
    """Classification trained with ``loss`` (``conf/loss/``: cross-entropy by default, or the
    certified-margin loss), on Lightning's automatic optimization: the training step is the margin
    the loss asks for (the live weights' bound), the forward pass and the loss (``step.batch_loss``,
    which the benchmark's plain loop runs too); Lightning does backward, accumulation, clipping, the
    optimizer's step and the scheduler's, and the ``lit.constraint.WeightConstraint`` callback
    projects the weights after every step (``conf/callbacks/``). ``net`` is a
    ``models.protocol.LipschitzNetwork``. Validation and test report plain cross-entropy, accuracy,
    and the fraction certified at l2 radius ``certified_radius`` (``certify``'s check with the exact
    bound of the weights at that point)."""

    data_kind = "images"  # the ``kind`` of datamodule it trains on (config/settings.py checks the pairing)
    loss_chunk = 4096  # positions per chunk of a language model's loss over its vocabulary

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        num_classes: Annotated[int, at.Ge(2)] = 10,
        compile: bool = False,
        loss: CrossEntropy | None = None,
        certified_radius: Radius = "36/255",
        loss_spike_factor: Annotated[float, at.Gt(1)] = 1.5,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler", "loss"])
        self.net = net
        self.loss = loss if loss is not None else CrossEntropy()
        # torch.compile of the network's forward (the training and validation passes; the
        # instrumented statistics pass stays eager). Not a registered submodule: the state dict
        # and checkpoints keep only self.net's keys.
        object.__setattr__(self, "_compiled_net", torch.compile(net) if compile else None)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._train_correct: torch.Tensor | int = 0
        self._train_certified: torch.Tensor | int = 0
        self._train_count = 0
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_loss = MeanMetric()
        self.certified_radius = parse_radius(certified_radius)
        self.certified_fraction = {"val": CorrectFraction(), "test": CorrectFraction()}
        # per split, the certificate of the weights this validation runs with (taken at its first batch,
        # after any weight-averaging callback has swapped its weights in): the margins and the bound
        # they are checked against come from the same weights
        self._certificate: dict[str, PairCertificate | None] = {"val": None, "test": None}
        self._unchecked_losses: list[tuple[int, torch.Tensor]] = []
        self.loss_spikes = LossSpikes(loss_spike_factor)
        # the run's resolved config, set by commands.train.build: checkpoints carry it, so that a
        # checkpoint alone says which data and settings it was trained with
        self.run_config: dict | None = None

    @property
    def fast_net(self) -> nn.Module:
        return self.net if self._compiled_net is None else self._compiled_net

    @property
    def train_forward(self) -> Callable:
        """What the training step calls on a batch: the network's forward (compiled when asked)."""
        return self.fast_net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast_net(x)

    def progress(self) -> float:
        """The fraction of training done (a language model's sliding window grows with it)."""
        return self.global_step / self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 1.0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        step = self.global_step  # the optimizer step this batch belongs to (one of its micro-batches)
        # Logging and the finiteness check each cost a host sync (and ~1 ms of Python per
        # self.log): on accelerators do them every log_every_n_steps, on the step's last micro-batch
        last_part = (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        logging_step = last_part and step % self.trainer.log_every_n_steps == 0
        watch = self.stability_watch(step, logging_step)
        margin = training_margin(self.net, self.loss)
        counts = batch_loss(self.net, self.train_forward if watch is None else self.net.features, x, y, self.loss, margin,
                            self.progress(), self.loss_chunk, watch)
        loss = counts.loss.detach()
        # counts stay on the device until a logging step: a torchmetrics update would check its
        # inputs and count classes on the host, a device sync every step
        self._train_correct = self._train_correct + counts.correct
        self._train_certified = self._train_certified + counts.certified
        self._train_count += y.numel()
        self._unchecked_losses.append((step, loss))
        if logging_step or loss.device.type == "cpu":
            self._check_losses()
        if logging_step:
            self.log("train/loss", loss, prog_bar=True)
            # over the micro-batches since the last log
            self.log("train/acc", torch.as_tensor(self._train_correct).float() / float(self._train_count))
            if margin is not None:
                # the fraction of training points the loss counted as certified at its radius: of
                # 16-bit logits under mixed precision, where it is an estimate, not a certificate
                estimate = str(self.trainer.precision) in SIXTEEN_BIT_FORWARD
                key = "train/certified_estimate" if estimate else "train/certified"
                self.log(key, torch.as_tensor(self._train_certified).float() / float(self._train_count))
                self.log("train/margin", margin.float().max())  # per pair of classes: the largest
            self._train_correct, self._train_certified, self._train_count = 0, 0, 0
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("stability/loss_spikes", float(self.loss_spikes.count))
            if watch:
                self.log_dict(watch_metrics(watch, self._watched_bounds), reduce_fx="max", sync_dist=True)
        return counts.loss

    def stability_watch(self, step: int, logging_step: bool) -> dict | None:
        """A dict for this step's forward passes to record their largest attention logits and
        activations in (a language model, on logging steps; every step when it clips logits), with
        the certificate's bounds on them for the weights of this forward pass; None otherwise."""
        return None

    def on_train_end(self) -> None:
        self._check_losses()

    def _check_losses(self) -> None:
        """The losses since the last check, read at once: a NaN or inf stops the run with its step;
        the others count towards the loss spikes."""
        if not self._unchecked_losses:
            return
        steps, losses = zip(*self._unchecked_losses)
        self._unchecked_losses.clear()
        values = torch.stack(losses).tolist()
        finite = [math.isfinite(value) for value in values]
        if not all(finite):
            first = finite.index(False)
            raise TrainingDiverged(f"training loss is {values[first]} at step {steps[first]}: the run diverged")
        self.loss_spikes.update(values)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits, y = flatten_positions(self(x), y)
        self._log_validation(logits, y)

    def _log_validation(self, logits: torch.Tensor, y: torch.Tensor, split: str = "val") -> None:
        mean_loss, accuracy = (self.val_loss, self.val_acc) if split == "val" else (self.test_loss, self.test_acc)
        mean_loss(F.cross_entropy(logits, y, reduction="none"))
        accuracy(logits, y)
        if self._certificate[split] is None:
            self._certificate[split] = PairCertificate.of(self.net, logits.shape[-1], self.certified_radius)
        safe = self._certificate[split].certified(logits.detach(), y, self.certified_radius)
        self.certified_fraction[split].to(self.device).update(safe.sum(), safe.numel())
        self.log(f"{split}/loss", mean_loss, prog_bar=True)
        self.log(f"{split}/acc", accuracy, prog_bar=True)

    def _log_certified(self, split: str) -> None:
        """The fraction of the split certified at ``certified_radius``, per pair of classes where the
        network has that certificate (``robustness.certified.PairCertificate``)."""
        if self._certificate[split] is None:
            return
        self._certificate[split] = None
        fraction = self.certified_fraction[split].to(self.device)
        self.log(f"{split}/certified_acc", fraction.compute())
        fraction.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_certified("val")

    def on_test_epoch_end(self) -> None:
        self._log_certified("test")

    def test_step(self, batch, batch_idx: int) -> None:
        """The test split, when the data holds validation out of the training images (``data.holdout``)."""
        x, y = batch
        logits, y = flatten_positions(self(x), y)
        self._log_validation(logits, y, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["network"] = network_record(self.net)
        checkpoint["run_config"] = self.run_config

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.net.param_specs()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def watch_metrics(stats: dict, certificate) -> dict[str, torch.Tensor | float]:
    """What a training step's forward pass reached, per block, beside what the certificate bounds it
    by (``stability/``): the largest pre-softmax logit and |logit| (bound: ``attention_logit``) and
    the largest token RMS of the block's output (bound: ``activation_rms``)."""
    metrics = {}
    for l, (activation, logit) in enumerate(zip(certificate.activation_rms, certificate.attention_logit)):
        metrics[f"stability/attention_max_logit_{l}"] = stats[f"attention/max_logit_{l}"].float()
        metrics[f"stability/attention_max_abs_logit_{l}"] = stats[f"attention/max_abs_logit_{l}"].float()
        metrics[f"stability/attention_logit_bound_{l}"] = float(logit)
        metrics[f"stability/activation_rms_max_{l}"] = stats[f"activation/rms_max_block{l}"].float()
        metrics[f"stability/activation_rms_bound_{l}"] = float(activation)
    return metrics


class LanguageModelModule(ClassificationModule):
    """Next-token prediction: mean token cross-entropy and token accuracy over ``vocab_size`` classes.

    The loss is taken over the vocabulary ``loss_chunk`` positions at a time
    (``GPT.next_token_loss``), so no step or validation holds every position's logits.
    The network sees the sliding window of the current point of training (``net.window_blocks``).
    Validation also runs the network's instrumented forward (``net.features(x, stats=...)``, the
    softmax written out) and logs, as maxima over the validation set, each block's largest
    activation RMS and entry and each layer's largest pre-softmax attention logit: the quantities
    that blow up without constraints. On sequences longer than ``stats_tokens`` (48k tokens in the
    NanoGPT recipe: a dense T x T score matrix would not fit) the statistics come from the first
    ``stats_tokens`` tokens of the batch's first sequence, which, the model being causal, are
    exactly those tokens' activations in the full pass.
    Checkpoints carry the network's constructor arguments and its data's vocabulary (the characters,
    or the tokenizer's name), so that ``python -m lipschitz_lightning.sample`` rebuilds the model from the
    checkpoint alone.
    """

    data_kind = "tokens"

    def __init__(self, net: nn.Module, optimizer, scheduler=None, vocab_size: PositiveInt = 65,
                 stats_tokens: PositiveInt = 4096, compile: bool = False, loss_chunk: PositiveInt = 4096,
                 loss: CrossEntropy | None = None, loss_spike_factor: Annotated[float, at.Gt(1)] = 1.5):
        super().__init__(net, optimizer, scheduler, num_classes=vocab_size, compile=compile, loss=loss,
                         loss_spike_factor=loss_spike_factor)
        self.stats_tokens, self.loss_chunk = stats_tokens, loss_chunk
        self.val_acc = CorrectFraction()
        object.__setattr__(self, "_compiled_features", torch.compile(net.features) if compile else None)
        self.vocab_chars: str | None = None
        self.tokenizer: str | None = None
        self._stat_maxima: dict[str, torch.Tensor] = {}
        self._step_stats: tuple[int, dict] | None = None  # (step, what its forward passes recorded) for QK-clip

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        vocab = getattr(datamodule, "vocab", None)
        self.vocab_chars = vocab.chars if vocab is not None else self.vocab_chars
        self.tokenizer = getattr(datamodule, "tokenizer", None) or self.tokenizer

    def window(self, device: torch.device) -> torch.Tensor | None:
        """The attention window at this point of training (``net.window``); outside a fit, the last."""
        return self.net.window(self.progress(), device)

    def stability_watch(self, step: int, logging_step: bool) -> dict | None:
        if not logging_step and self.net.logit_clip is None:
            return None
        if logging_step:
            # the certificate of the weights this step's forward pass uses, before the step moves them
            self._watched_bounds = self.net.certificate()
        if self.net.logit_clip is None:
            return {}
        # one dict for all micro-batches of the step: QK-clip reads their maxima after the step
        if self._step_stats is None or self._step_stats[0] != step:
            self._step_stats = (step, {})
        return self._step_stats[1]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # QK-clip (a baseline: Kimi's MuonClip), after the step and its projection (the optimizer's hook)
        if self.net.logit_clip is not None and self._step_stats is not None:
            self.net.clip_logits(self._step_stats[1])

    @property
    def train_forward(self) -> Callable:
        """What the training step calls: the features (compiled when asked); the loss takes the head."""
        return self.net.features if self._compiled_features is None else self._compiled_features

    def forward(self, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        if stats is not None:
            return self.net(x, stats=stats, window=self.window(x.device))
        return self.fast_net(x, window=self.window(x.device))

    def features(self, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        if stats is not None or self._compiled_features is None:
            return self.net.features(x, stats=stats, window=self.window(x.device))
        return self._compiled_features(x, window=self.window(x.device))

    def validation_step(self, batch, batch_idx: int) -> None:
        x, _ = batch
        stats: dict[str, torch.Tensor] = {}
        if x.shape[1] <= self.stats_tokens:
            features = self.features(x, stats=stats)  # one instrumented pass gives the loss and the statistics
        else:
            features = self.features(x)
            self.features(x[:1, : self.stats_tokens], stats=stats)
        for name, value in stats.items():
            previous = self._stat_maxima.get(name)
            self._stat_maxima[name] = value if previous is None else torch.maximum(previous, value)
        # validation reports plain cross-entropy, whatever loss trains
        loss, correct, _ = self.net.next_token_loss(features, batch[1], self.loss_chunk)
        count = batch[1].numel()
        self.val_loss.update(loss, weight=count)
        self.val_acc.update(correct, count)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        # every rank logs every key, also a rank that saw no batch, or the synchronisation hangs
        empty = torch.tensor(float("-inf"), device=self.device)
        maxima = {name: self._stat_maxima.get(name, empty).float() for name in self.net.stat_names()}
        self.log_dict(maxima, reduce_fx="max", sync_dist=True)
        self._stat_maxima = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["network"] = network_record(self.net, self.vocab_chars, self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        record = checkpoint.get("network", {})
        self.vocab_chars = record.get("vocab", self.vocab_chars)
        self.tokenizer = record.get("tokenizer", self.tokenizer)
