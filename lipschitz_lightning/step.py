"""One training step, top to bottom (SPEC §3): the margin a certified loss asks for, forward and
loss, backward, the optimizer's step; the projection runs in the optimizer's step hook
(``core.projection.Projection.attach``), so nothing here calls it.

The Lightning module (``lit.modules``) runs ``training_margin`` and ``batch_loss`` in its
``training_step`` and leaves backward and the step to Lightning's automatic optimization; the
benchmark's plain loop (``commands.timing``) runs ``train_step`` as it is. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipschitz_lightning.core.losses import CrossEntropy, LossCounts
from lipschitz_lightning.models.protocol import ClipsAttentionLogits, NextTokenModel, PairwiseCertificate


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
    device: per pair of classes ``(classes, classes)`` where the loss asks for it and the network
    has that bound, else one number. None for a loss without a radius."""
    if loss.radius <= 0:
        return None
    if loss.pairwise and isinstance(net, PairwiseCertificate):
        return net.pairwise_l2_bound(loss.radius) * loss.radius
    return loss.margin(net.logit_l2_bound(loss.radius))


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


def train_step(net: nn.Module, x: Tensor, y: Tensor, loss: CrossEntropy, optimizer: torch.optim.Optimizer, *,
               progress: float = 0.0, forward: Callable | None = None, loss_chunk: int = 4096) -> StepResult:
    """One optimizer step on the batch ``(x, y)``, outside Lightning: what the Lightning module's
    training step and Lightning's automatic optimization do together, for one micro-batch.

    ``forward``: the network's forward (``net``, or a compiled one; a language model's ``features``);
    ``progress``: the fraction of training done (a language model's sliding window grows with it).
    A projection attached to ``optimizer`` runs inside ``optimizer.step()``.
    """
    forward = forward or net
    clips_logits = isinstance(net, ClipsAttentionLogits) and net.logit_clip is not None
    stats = {} if clips_logits else None

    # ---- the margin a certified-margin loss asks of every prediction (the live weights' bound)
    margin = training_margin(net, loss)
    optimizer.zero_grad(set_to_none=True)
    # ---- forward and loss
    counts = batch_loss(net, net.features if clips_logits else forward, x, y, loss, margin, progress, loss_chunk, stats)
    # ---- backward
    counts.loss.backward()
    # the step and the projection in the weights' own precision, also when the forward ran under autocast
    with torch.autocast(x.device.type, enabled=False):
        # ---- the optimizer's step (SPEC §3 steps 1-3): Muon's momentum, Newton-Schulz direction,
        # decay and W <- W - lr D (under DDP sharded: reduce-scatter, owned weights stepped and
        # projected, all-gather), or AdamW's; then its hook: the projection (SPEC §3 step 4)
        optimizer.step()
        # ---- QK-clip, for a model that asks for it (a baseline: Kimi's MuonClip)
        if clips_logits:
            net.clip_logits(stats)
    return StepResult(counts.loss.detach(), counts.correct, counts.certified if margin is not None else 0, y.numel(), margin)
