"""One training step, top to bottom (SPEC §3): the margin a certified loss asks for, forward and
loss, backward, the optimizer's step, the projection.

The Lightning module (``lit.modules``) runs this function for every optimizer step, passing
Lightning's backward (mixed precision, DDP) and its optimizer wrapper; the benchmark's plain loop
(``commands.timing``) runs it as it is. So there is one hot path, to read and to time. Pure torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lipschitz_lightning.core.losses import CrossEntropy, LossCounts
from lipschitz_lightning.core.projection import Projection


@runtime_checkable
class NextTokenModel(Protocol):
    """A language model whose loss takes the head itself, over the vocabulary in chunks, so that no
    step holds every position's logits (``models.gpt.GPT``)."""

    def window(self, progress: float, device: torch.device) -> Tensor | None: ...

    def next_token_loss(self, features: Tensor, targets: Tensor, chunk: int, loss: CrossEntropy | None,
                        margin: Tensor | None) -> LossCounts: ...


@runtime_checkable
class ClipsAttentionLogits(Protocol):
    """A model with Kimi's QK-clip: after every step, heads whose logits passed ``logit_clip`` shrink
    their q and k (``models.gpt.GPT.clip_logits``; None: off)."""

    logit_clip: float | None

    def clip_logits(self, stats: dict) -> None: ...


@dataclass
class StepResult:
    loss: Tensor  # the step's mean training loss, detached
    correct: Tensor  # predictions whose largest logit is the target (int64, on the device)
    certified: Tensor | int  # predictions whose margin clears the loss's margin (0 without one)
    count: int  # predictions made
    margin: Tensor | None  # the loss's margin this step (None: a loss without a radius)


def flatten_positions(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Every position of a sequence is one classification: (..., classes) -> (N, classes)."""
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def training_margin(net: nn.Module, loss: CrossEntropy) -> Tensor | None:
    """The logit margin that certifies ``loss.radius`` with the weights this step's forward pass uses:
    their bound on the domain the radius needs (docs/certified_training.md), a tensor left on the
    device. None for a loss without a radius."""
    return loss.margin(net.logit_l2_bound(loss.radius)) if loss.radius > 0 else None


def batch_loss(net: nn.Module, forward: Callable, x: Tensor, y: Tensor, loss: CrossEntropy, margin: Tensor | None,
               progress: float = 1.0, loss_chunk: int = 4096, stats: dict | None = None) -> LossCounts:
    """One batch's loss and counts: a language model's features (under the sliding window of this
    point of training) through its chunked next-token loss, a classifier's logits through ``loss``.
    ``stats``: a language model's forward also records its attention logits and activations there."""
    if isinstance(net, NextTokenModel):
        window = net.window(progress, x.device)
        features = forward(x, window=window) if stats is None else forward(x, window=window, stats=stats)
        return net.next_token_loss(features, y, loss_chunk, loss, margin)
    logits, targets = flatten_positions(forward(x), y)
    return loss(logits, targets, margin)


def train_step(
    net: nn.Module,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    loss: CrossEntropy,
    optimizer: torch.optim.Optimizer,
    projection: Projection,
    *,
    progress: float = 0.0,
    forward: Callable | None = None,
    loss_chunk: int = 4096,
    backward: Callable[[Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    clip_gradients: Callable[[], None] | None = None,
    stats: dict | None = None,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (one, or several whose gradients add up).

    ``forward``: the network's forward (``net``, or a compiled one; a language model's ``features``);
    ``progress``: the fraction of training done (a language model's sliding window grows with it);
    ``backward``: ``Tensor.backward``, or Lightning's ``manual_backward``; ``no_sync``: a context in
    which a backward does not synchronise gradients across DDP ranks (all micro-batches but the
    last); ``clip_gradients``: called between backward and the optimizer's step; ``stats``: a
    language model's forward records its largest attention logits and activations there (a model
    with QK-clip always does; ``forward`` must then take ``stats``: not a compiled one).
    """
    forward = forward or net
    backward = backward or Tensor.backward
    parts = len(micro_batches)
    clips_logits = isinstance(net, ClipsAttentionLogits) and net.logit_clip is not None
    if clips_logits and stats is None:
        stats = {}

    # ---- the margin a certified-margin loss asks of every prediction (the live weights' bound)
    margin = training_margin(net, loss)

    optimizer.zero_grad(set_to_none=True)
    total = correct = certified = seen = 0
    for index, (x, y) in enumerate(micro_batches):
        with no_sync() if index < parts - 1 else contextlib.nullcontext():
            # ---- forward and loss
            counts = batch_loss(net, forward, x, y, loss, margin, progress, loss_chunk, stats)
            # ---- backward: each micro-batch's share of the step's mean loss
            backward(counts.loss if parts == 1 else counts.loss / parts)
        total = total + counts.loss.detach()
        correct, certified, seen = correct + counts.correct, certified + counts.certified, seen + y.numel()

    # the step and the projection in the weights' own precision, also when mixed precision runs
    # the forward pass under autocast (Lightning enters it around the whole training step)
    with torch.autocast(x.device.type, enabled=False):
        if clip_gradients is not None:
            clip_gradients()
        # ---- the optimizer's step (SPEC §3 steps 1-3): Muon's momentum, Newton-Schulz direction,
        # decay and W <- W - lr D (under DDP sharded: reduce-scatter, owned weights stepped and
        # projected, all-gather), or AdamW's
        optimizer.step()
        # ---- the projection (SPEC §3 step 4): the constraint on every weight, unless the step ran it
        projection.after_step()
        # ---- QK-clip, for a model that asks for it (a baseline: Kimi's MuonClip)
        if clips_logits:
            net.clip_logits(stats)
    return StepResult(total if parts == 1 else total / parts, correct, certified if margin is not None else 0, seen, margin)
