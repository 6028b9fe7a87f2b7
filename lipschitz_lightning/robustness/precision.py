"""Weights at a lower precision: what rounding a trained network's weights to bfloat16 or float8 costs;
a frozen copy of a network in a given dtype (the float64 network every check compares against)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def cast_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to ``dtype`` and back to its own dtype. For float8 e4m3 the tensor is first
    divided by a per-tensor scale that maps its largest magnitude onto the format's largest value
    (448), and multiplied back after (the amax scaling of fp8 training recipes); without it the
    RMS-scaled weights (entries around 1e-2) would lose most of e4m3's 3 mantissa bits to subnormals."""
    if dtype == torch.float8_e4m3fn:
        scale = t.abs().max().clamp(min=torch.finfo(torch.float32).tiny) / FLOAT8_MAX
        return (t / scale).to(dtype).to(t.dtype) * scale
    return t.to(dtype).to(t.dtype)


def with_weights_cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``net`` whose parameters went through ``dtype`` (``cast_tensor``); it computes in float32."""
    cast = copy.deepcopy(net)
    with torch.no_grad():
        for p in cast.parameters():
            p.copy_(cast_tensor(p, dtype))
    return cast


def frozen(net: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``net`` in ``dtype``, in eval mode, with no gradients for its parameters."""
    net = copy.deepcopy(net).to(dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def weights_in_low_precision(net: nn.Module, x: Tensor, y: Tensor, batch: int, accuracy: float, bound: float) -> dict:
    """Accuracy and certified bound with the weights rounded to bfloat16 and float8 (e4m3), beside
    float32's ``accuracy`` and ``bound``."""
    precision = {"float32": {"accuracy": accuracy, "bound_rms": bound}}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float8_e4m3", torch.float8_e4m3fn)):
        cast = with_weights_cast(net, dtype)
        with torch.no_grad():
            predictions = torch.cat([cast(part) for part in x.split(batch)]).argmax(dim=1)
        precision[name] = {"accuracy": float((predictions == y).float().mean()), "bound_rms": float(cast.certified_bound())}
    return precision
