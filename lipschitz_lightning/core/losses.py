"""The training losses: cross-entropy with a temperature, the certified-margin loss, and a language
model's loss over a large vocabulary without every position's logits in memory.

Certified margin (docs/certified_training.md)
---------------------------------------------
``CertifiedMargin(radius, temperature)`` is ``CE(tau * (z - m * onehot(y)))``, the same as
``CE(tau * (z + m * (1 - onehot(y))))`` (a shift common to all logits leaves cross-entropy alone),
with ``m = sqrt(2) * L_l2 * radius``: ``L_l2`` the Lipschitz bound of the logits in l2 units of the
input (``net.logit_l2_bound()``, the exact bound of the weights this forward pass uses). A
training point whose logit margin exceeds ``m`` is certified at ``radius``: no input within that
l2 distance changes its class (``certify``'s check, ``robustness.certified.certified``). The
offset logits' argmax is the true class exactly when that holds, so the loss counts certified
points for free (``LossCounts``). ``CrossEntropy`` is the case ``m = 0``; its default temperature 1 is plain
cross-entropy, bit for bit.

Large vocabularies
------------------

``linear_cross_entropy(features, weight, targets, scale, chunk)`` is
``F.cross_entropy(scale * features @ weight.T, targets)`` together with the number of positions whose
largest logit is the target, computed ``chunk`` positions at a time. When gradients are wanted,
each chunk's gradient with respect to its logits, ``scale * (softmax - onehot) / N``, is turned
into the features' and the weight's gradients at once, so the peak is one chunk's logits
(``chunk x vocab``) instead of all of them. For the NanoGPT's validation sequence of 262,144 tokens
over 50,304 tokens that is the difference between 0.8 GiB and the 24.6 GiB of bf16 logits plus two
float32 copies of them (~123 GiB) that ``F.cross_entropy`` on full logits needs.

The matrix products are the ones autograd would run (three per chunk, in the same dtypes under
autocast), so it costs no extra FLOPs; ``backward`` only scales the stored gradients.

Why not a library: liger-kernel's fused linear cross-entropy is this idea in Triton, CUDA only;
this one runs on every device, CPU tests included.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lipschitz_lightning.core.types import Positive, Radius, parse_radius


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit of the true class minus the largest other logit: positive when correctly classified."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


class LossCounts(NamedTuple):
    """A mean loss and two counts, tensors left on the device (read them when logging)."""

    loss: Tensor
    correct: Tensor  # positions whose largest logit is the target
    certified: Tensor  # positions whose margin exceeds the loss's margin (all correct ones for margin 0)


class CrossEntropy:
    """``CE(temperature * logits)``. A bounded network cannot make its logits large: a temperature
    above 1 lets its softmax become confident anyway (docs/certified_training.md)."""

    radius = 0.0
    pairwise = False

    def __init__(self, temperature: Positive = 1.0):
        self.temperature = float(temperature)

    def margin(self, logit_l2_bound: float | Tensor) -> float | Tensor:
        """The logit margin a training point must clear to count as certified: none here."""
        return 0.0

    def __call__(self, logits: Tensor, targets: Tensor, margin: float | Tensor | None = None) -> LossCounts:
        """Mean loss, the correctly classified points, and those whose margin exceeds ``margin``
        (a number, or a 0-d tensor left on the device; None: no margin). A ``(classes, classes)``
        margin is per pair of classes: ``margin[y, j]`` is added to class ``j``'s logit of a point of
        class ``y`` (zero diagonal), and a point counts as certified when the true class stays first."""
        correct = (logits.detach().argmax(dim=-1) == targets).sum()
        if margin is None:
            offset, certified = logits, correct
        elif isinstance(margin, Tensor) and margin.ndim == 2:
            offset = logits + margin[targets].to(logits.dtype)
            certified = (margins(offset.detach(), targets) > 0).sum()
        else:
            shift = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device).neg().expand(len(targets), 1)
            offset = logits.scatter_add(1, targets[:, None], shift)
            certified = (margins(logits.detach(), targets) > margin).sum()  # certify's strict test
        scaled = offset if self.temperature == 1.0 else offset * self.temperature
        return LossCounts(F.cross_entropy(scaled, targets), correct, certified)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(temperature={self.temperature:g})"


class CertifiedMargin(CrossEntropy):
    """Cross-entropy that demands, for the true class, a logit margin certifying ``radius``.

    ``radius`` is an l2 distance in the input's units: pixels in [0, 1] for the CIFAR-10 MLP (as
    ``certify`` reports it, e.g. ``36/255``), token RMS of the embedded sequence for the GPT.
    ``pairwise``: where the network knows its bound per pair of classes (``pairwise_l2_bound``, never
    looser), each other class gets its own margin ``K[y, j] * radius`` (``step.training_margin``);
    else every class gets ``sqrt(2) L_l2 radius``.
    """

    def __init__(self, radius: Radius = "36/255", temperature: Positive = 10.0, pairwise: bool = True):
        super().__init__(temperature)
        self.radius = parse_radius(radius)
        self.pairwise = pairwise

    def margin(self, logit_l2_bound: float | Tensor) -> float | Tensor:
        return math.sqrt(2) * logit_l2_bound * self.radius

    def __repr__(self) -> str:
        return f"{type(self).__name__}(radius={self.radius:.6g}, temperature={self.temperature:g}, pairwise={self.pairwise})"


def _chunked(features: Tensor, weight: Tensor, targets: Tensor, scale: float, chunk: int,
             grad_features: Tensor | None, grad_weight: Tensor | None, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss sum, the correct positions and those whose margin exceeds ``margin``; fills the
    gradients of the mean loss where buffers are given. ``scale`` multiplies the offset logits
    (final scale times temperature); ``margin`` (None: none) is in units of ``scale``-multiplied logits."""
    count = features.shape[0]
    precision = torch.promote_types(weight.dtype, torch.float32)  # the softmax never in 16 bits
    loss_sum = torch.zeros((), dtype=precision, device=features.device)
    correct = torch.zeros((), dtype=torch.int64, device=features.device)
    certified = torch.zeros((), dtype=torch.int64, device=features.device) if margin is not None else correct
    for start in range(0, count, chunk):
        x, y = features[start : start + chunk], targets[start : start + chunk]
        logits = (x @ weight.mT).to(precision)  # a bf16 product under autocast, as the head's would be
        if scale != 1.0:
            logits.mul_(scale)
        rows = torch.arange(len(y), device=y.device)
        correct += (logits.argmax(dim=-1) == y).sum()
        if margin is not None:
            logits[rows, y] -= margin.to(logits.dtype)
            certified += (logits.argmax(dim=-1) == y).sum()  # the true class still first after the offset
        target_logit = logits[rows, y]
        # the softmax in place of the logits: one chunk x vocab buffer, no second one for logsumexp
        largest = logits.amax(dim=-1, keepdim=True)
        exponentials = logits.sub_(largest).exp_()
        total = exponentials.sum(dim=-1, keepdim=True)
        loss_sum += (total.log() + largest).squeeze(1).sub_(target_logit).sum()
        if grad_features is None and grad_weight is None:
            del logits, exponentials  # before the next chunk's product, not after it
            continue
        # d(mean loss)/d(x W^T) = scale * (softmax - onehot) / count
        gradient = exponentials.div_(total)
        gradient[rows, y] -= 1.0
        gradient.mul_(scale / count)
        if grad_features is not None:
            grad_features[start : start + chunk] = gradient @ weight
        if grad_weight is not None:
            grad_weight += gradient.mT @ x
        del logits, exponentials, gradient
    return loss_sum, correct, certified


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, scale: float, chunk: int, margin: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if ctx.needs_input_grad[1] else None
        loss_sum, correct, certified = _chunked(features, weight, targets, scale, chunk, grad_features, grad_weight, margin)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct, certified)
        return loss_sum / features.shape[0], correct, certified

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor, _grad_certified: Tensor):
        grad_features, grad_weight = ctx.saved_tensors
        return (
            None if grad_features is None else grad_features * grad_loss.to(grad_features.dtype),
            None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
            None, None, None, None,
        )


def linear_cross_entropy(features: Tensor, weight: Tensor, targets: Tensor, scale: float = 1.0, chunk: int = 4096,
                         loss: CrossEntropy | None = None, margin: float | Tensor | None = None) -> LossCounts:
    """Mean cross-entropy of the logits ``z = scale * features @ weight.T`` against ``targets``, the
    positions whose largest logit is the target and those whose margin exceeds ``margin`` (int64
    tensors; read them when logging, so that no step waits for the device).

    With ``loss`` (a ``CrossEntropy`` or ``CertifiedMargin``), the loss is ``loss``'s:
    ``CE(temperature * (z - margin * onehot))``; ``margin`` is a number or a 0-d tensor left on the
    device (None: no margin). ``features``: ``(positions, width)``; ``weight``: ``(vocab, width)``;
    ``targets``: ``(positions,)``.
    """
    temperature = loss.temperature if loss is not None else 1.0
    args = (float(scale) * temperature, int(chunk))
    offset = None if margin is None else torch.as_tensor(margin, device=features.device) * temperature
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return LossCounts(*_LinearCrossEntropy.apply(features, weight, targets, *args, offset))
    loss_sum, correct, certified = _chunked(features, weight, targets, *args, None, None, offset)
    return LossCounts(loss_sum / features.shape[0], correct, certified)
