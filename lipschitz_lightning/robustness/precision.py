"""Weights at a lower precision: what rounding a trained network's weights to bfloat16 or float8 costs."""

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
