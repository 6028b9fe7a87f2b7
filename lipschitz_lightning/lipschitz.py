"""Norms in the SPEC's units and the certified Lipschitz bounds (SPEC §2, §7). Pure torch."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

# GeLU's largest slope: the MLP divides by it so that its nonlinearity is 1-Lipschitz.
GELU_MAX_SLOPE = 1.1289


@torch.no_grad()
def rms_norm(W: Tensor) -> float:
    """Exact RMS->RMS operator norm ``sqrt(fanin / fanout) * sigma_max(W)`` of a ``(fanout, fanin)`` matrix."""
    fanout, fanin = W.shape[-2:]
    sigma = torch.linalg.matrix_norm(W.detach().float(), ord=2)
    return float(sigma.max()) * math.sqrt(fanin / fanout)


@torch.no_grad()
def embedding_norm(E: Tensor) -> float:
    """Largest RMS of a token vector of an ``(num_tokens, d)`` table (rows are tokens)."""
    return float(E.detach().float().pow(2).mean(dim=-1).sqrt().max())


def mlp_bound(norms: Mapping[str, float], final_scale: float = 1.0) -> float:
    """Product of the layers' RMS->RMS norms: ReLU is 1-Lipschitz and there are no residuals."""
    return final_scale * math.prod(norms.values())


def gpt_bound(
    norms: Mapping[str, float], num_blocks: int, softmax_scale: float = 1.0, residual_scale: float = 1.0
) -> float:
    """Certified bound of the Modula GPT (SPEC §7).

    ``norms`` holds ``embed``, ``out`` and per block ``l``: ``q{l} k{l} v{l} w{l} mlp_in{l} mlp_out{l}``
    (``mlp_in`` the up projection, ``mlp_out`` the down projection).
    """
    a = residual_scale / (2 * num_blocks)
    x, activation_bounds = 1.0, []
    for l in range(num_blocks):
        activation_bounds.append(x)
        x = (1 - a) * x + a * (norms[f"w{l}"] * norms[f"v{l}"] / 3) * x
        x = (1 - a) * x + a * (norms[f"mlp_out{l}"] * norms[f"mlp_in{l}"] / GELU_MAX_SLOPE) * x

    L = norms["embed"]
    for l, x_l in enumerate(activation_bounds):
        q, k, v, w = (norms[f"{name}{l}"] for name in "qkvw")
        attention = (w / 3) * (v + 2 * v * x_l**2 * q * k) * softmax_scale
        L = (1 - a) * L + a * L * attention
        mlp = norms[f"mlp_out{l}"] * norms[f"mlp_in{l}"] / GELU_MAX_SLOPE
        L = (1 - a) * L + a * L * mlp
    return L * norms["out"]
