"""A language model's loss over a large vocabulary, without every position's logits in memory.

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

import torch
from torch import Tensor


def _chunked(features: Tensor, weight: Tensor, targets: Tensor, scale: float, chunk: int,
             grad_features: Tensor | None, grad_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Loss sum and correct count; fills the gradients of the mean loss where buffers are given."""
    count = features.shape[0]
    precision = torch.promote_types(weight.dtype, torch.float32)  # the softmax never in 16 bits
    loss_sum = torch.zeros((), dtype=precision, device=features.device)
    correct = torch.zeros((), dtype=torch.int64, device=features.device)
    for start in range(0, count, chunk):
        x, y = features[start : start + chunk], targets[start : start + chunk]
        logits = (x @ weight.mT).to(precision)  # a bf16 product under autocast, as the head's would be
        if scale != 1.0:
            logits.mul_(scale)
        target_logit = logits.gather(1, y[:, None]).squeeze(1)
        correct += (logits.argmax(dim=-1) == y).sum()
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
        gradient[torch.arange(len(y), device=y.device), y] -= 1.0
        gradient.mul_(scale / count)
        if grad_features is not None:
            grad_features[start : start + chunk] = gradient @ weight
        if grad_weight is not None:
            grad_weight += gradient.mT @ x
        del logits, exponentials, gradient
    return loss_sum, correct


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if ctx.needs_input_grad[1] else None
        loss_sum, correct = _chunked(features, weight, targets, scale, chunk, grad_features, grad_weight)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum / features.shape[0], correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor):
        grad_features, grad_weight = ctx.saved_tensors
        return (
            None if grad_features is None else grad_features * grad_loss.to(grad_features.dtype),
            None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
            None, None, None,
        )


def linear_cross_entropy(features: Tensor, weight: Tensor, targets: Tensor, scale: float = 1.0, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of the logits ``scale * features @ weight.T`` against ``targets`` and the
    number of positions whose largest logit is the target (an int64 tensor; read it when logging,
    so that no step waits for the device).

    ``features``: ``(positions, width)``; ``weight``: ``(vocab, width)``; ``targets``: ``(positions,)``.
    """
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(features, weight, targets, float(scale), int(chunk))
    loss_sum, correct = _chunked(features, weight, targets, float(scale), int(chunk), None, None)
    return loss_sum / features.shape[0], correct
