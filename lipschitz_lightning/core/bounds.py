"""Norms in the SPEC's units and the certified Lipschitz bounds (SPEC §2, §7). Pure torch.

The GPT certificate (``gpt_certificate``) is derived line by line in ``docs/certificate.md``; the
paper's formula (``gpt_bound_paper_formula``) is kept for parity with the reference code only: it
is not an upper bound for several heads, for ``softmax_scale < 1``, or for token RMS above 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lipschitz_lightning.core.linalg import sigma_upper_bound, spectral_norms

# The paper's GeLU divisor: the MLP computes gelu(x) / 1.1289 so that its nonlinearity is (almost)
# 1-Lipschitz. The models divide by this number; the certificate uses the true slopes below.
GELU_DIVISOR = 1.1289

# Largest slope of each GeLU, rounded up in the 7th digit. The exact GeLU's is
# Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.12890415; the tanh form's is 1.12899307. Both exceed the
# paper's divisor, so gelu / 1.1289 is up to 1.00008-Lipschitz, not 1 (tests recompute both).
GELU_MAX_SLOPE = {"tanh": 1.1289931, "exact": 1.1289042}

# Normalisation layers that are not Lipschitz near 0: a network that uses one has no certificate.
UNCERTIFIABLE_SUBSTITUTES = ("rmsnorm", "layernorm")


@torch.no_grad()
def rms_norm(W: Tensor) -> float:
    """Exact RMS->RMS operator norm ``sqrt(fanin / fanout) * sigma_max(W)`` of a ``(fanout, fanin)``
    matrix (the largest over a stack).

    ``sigma_max^2`` is the largest eigenvalue of the small Gram matrix, formed and solved in float64:
    for the 50304x768 head that is a 768x768 symmetric eigenproblem instead of an SVD of the whole
    matrix, and float64 keeps the rounding far below anything a certificate could notice.
    """
    fanout, fanin = W.shape[-2:]
    return float(spectral_norms(W.detach()).max()) * math.sqrt(fanin / fanout)


# Squarings of the Gram matrix for a norm that does not wait for an accelerator (sigma_upper_bound):
# at most n^(1/65536) above sigma_max, 1.00013x for n = 3072
SYNC_FREE_SQUARINGS = 14


@torch.no_grad()
def rms_norm_on_device(W: Tensor) -> Tensor:
    """``rms_norm`` as a float64 tensor on ``W``'s device, for a bound needed every step (the margin
    loss): exact on the CPU; on an accelerator, where an eigensolver checks its result on the host
    (a sync per call), the proven upper bound ``sigma_upper_bound``, within 0.013% of it for n <= 3072."""
    fanout, fanin = W.shape[-2:]
    if W.device.type == "cpu":
        sigma = spectral_norms(W.detach())
    else:
        sigma = sigma_upper_bound(W.detach().double(), squarings=SYNC_FREE_SQUARINGS)
    return sigma.max() * math.sqrt(fanin / fanout)


@torch.no_grad()
def embedding_norm(E: Tensor) -> float:
    """Largest RMS of a token vector of an ``(num_tokens, d)`` table (rows are tokens)."""
    return float(embedding_norm_on_device(E))


@torch.no_grad()
def embedding_norm_on_device(E: Tensor) -> Tensor:
    return E.detach().double().pow(2).mean(dim=-1).sqrt().max()


def mlp_bound(norms: Mapping[str, float], final_scale: float = 1.0) -> float:
    """Product of the layers' RMS->RMS norms: ReLU (and MaxMin) is 1-Lipschitz and there are no residuals."""
    return abs(final_scale) * math.prod(norms.values())


@torch.no_grad()
def head_row_distances(head: Tensor) -> Tensor:
    """``||W_y - W_j||_2`` for every pair of rows of a ``(classes, width)`` head, in float64 (where the
    difference of two float32 rows is exact): how far the logit difference ``f_y - f_j = W_y h - W_j h``
    moves per unit l2 of the head's input ``h`` (docs/certified_training.md, the per-pair certificate).
    At most ``sqrt(2) sigma_max(W)``, what the global bound gives every pair."""
    W = head.detach().double()
    return (W[:, None, :] - W[None, :, :]).norm(dim=-1)


# --------------------------------------------------------------------------------------------
# The GPT: a sound certificate (docs/certificate.md)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTCertificate:
    """What the weights' norms guarantee about the Modula GPT after its embedding.

    Every quantity is in the SPEC's units: a sequence's norm is its largest token RMS.
    """

    bound: float  # Lipschitz bound of forward_embedded on the domain: inputs of token RMS <= input_radius
    input_radius: float  # the domain's radius (see gpt_certificate)
    activation_rms: tuple[float, ...]  # per block: the largest token RMS its output can reach from the domain
    attention_logit: tuple[float, ...]  # per block: the largest |pre-softmax logit| of any head on the domain


def gpt_certificate(
    norms: Mapping[str, float],
    *,
    num_blocks: int,
    num_heads: int,
    softmax_scale: float = 1.0,
    residual_scale: float = 1.0,
    final_scale: float = 1.0,
    layernorm_substitute: str = "none",
    gelu: str = "tanh",
    input_radius: float | None = None,
    perturbation: float = 0.0,
) -> GPTCertificate:
    """The sound bound of docs/certificate.md, from the RMS->RMS norms of every weight.

    ``norms`` holds ``embed``, ``out`` and per block ``l``: ``q{l} k{l} v{l} w{l} mlp_in{l} mlp_out{l}``.
    Per block, with ``a = residual_scale / (2 L)``, ``H`` heads, ``s = softmax_scale`` and ``r`` the
    largest token RMS entering the attention (after ``tanh`` when that is the substitute):

    - attention: Lipschitz ``(w/3) (sqrt(H) v + 2 s H q k v r^2)``, output RMS ``<= (w/3) sqrt(H) v r``,
      logits ``|l| <= s H q k r^2``;
    - MLP: Lipschitz ``o i gelu_slope / 1.1289``, output RMS ``<= o i r / 1.1289``;
    - each residual mix: Lipschitz ``|1 - a| + a Lip(branch)``, RMS ``|1 - a| r + a RMS(branch)``.

    The bound is the product over the mixes times the head's norm and ``|final_scale|``.

    Everything holds on the domain ``D = {X : largest token RMS <= input_radius}`` only (the
    attention terms grow with ``r^2``): by default ``max(1, embed)``, every input the embedding can
    produce. A claim about inputs moved by ``perturbation`` from those (a certified margin at that
    radius) needs the domain ``max(1, embed) + perturbation`` (docs/certificate.md §0); an explicit
    ``input_radius`` replaces ``max(1, embed)``.
    Norms may be 0-d tensors (the margin loss's, left on the device): the result's are then too.
    """
    if layernorm_substitute in UNCERTIFIABLE_SUBSTITUTES:
        inf = (math.inf,) * num_blocks
        return GPTCertificate(math.inf, math.inf, inf, inf)
    squash = layernorm_substitute == "tanh"  # |tanh z| <= min(|z|, 1), and tanh is 1-Lipschitz
    a = residual_scale / (2 * num_blocks)
    keep = abs(1 - a)
    s, H = abs(softmax_scale), num_heads
    gelu_gain = GELU_MAX_SLOPE[gelu] / GELU_DIVISOR
    radius = (at_least(norms["embed"], 1.0) if input_radius is None else input_radius) + perturbation

    r, lipschitz = radius, 1.0
    activation_rms, attention_logit = [], []
    for l in range(num_blocks):
        q, k, v, w, i, o = (norms[f"{name}{l}"] for name in ("q", "k", "v", "w", "mlp_in", "mlp_out"))
        r_in = at_most(r, 1.0) if squash else r
        attention_logit.append(s * H * q * k * r_in**2)
        lipschitz = lipschitz * (keep + a * (w / 3) * (math.sqrt(H) * v + 2 * s * H * q * k * v * r_in**2))
        r = keep * r + a * (w / 3) * math.sqrt(H) * v * r_in

        r_in = at_most(r, 1.0) if squash else r
        lipschitz = lipschitz * (keep + a * o * i * gelu_gain)
        r = keep * r + a * o * i * r_in / GELU_DIVISOR
        activation_rms.append(r)
    bound = lipschitz * norms["out"] * abs(final_scale)
    return GPTCertificate(bound, radius, tuple(activation_rms), tuple(attention_logit))


def at_least(x: float | Tensor, floor: float) -> float | Tensor:
    """``max(x, floor)`` for a number, or a tensor left on its device (no host sync)."""
    return x.clamp(min=floor) if isinstance(x, Tensor) else max(x, floor)


def at_most(x: float | Tensor, ceiling: float) -> float | Tensor:
    return x.clamp(max=ceiling) if isinstance(x, Tensor) else min(x, ceiling)


# --------------------------------------------------------------------------------------------
# The GPT: the paper's formula (parity only)
# --------------------------------------------------------------------------------------------


def gpt_bound_paper_formula(
    norms: Mapping[str, float], num_blocks: int, softmax_scale: float = 1.0, residual_scale: float = 1.0
) -> float:
    """SPEC §7's formula, as the reference code computes it (``transformer_bound`` fixtures).

    Not a certificate: it misses a factor ``H`` on the score path and ``sqrt(H)`` on the value path
    for ``H`` heads, multiplies the value path by ``softmax_scale`` and assumes token RMS 1.
    """
    a = residual_scale / (2 * num_blocks)
    x, activation_bounds = 1.0, []
    for l in range(num_blocks):
        activation_bounds.append(x)
        x = (1 - a) * x + a * (norms[f"w{l}"] * norms[f"v{l}"] / 3) * x
        x = (1 - a) * x + a * (norms[f"mlp_out{l}"] * norms[f"mlp_in{l}"] / GELU_DIVISOR) * x

    L = norms["embed"]
    for l, x_l in enumerate(activation_bounds):
        q, k, v, w = (norms[f"{name}{l}"] for name in "qkvw")
        attention = (w / 3) * (v + 2 * v * x_l**2 * q * k) * softmax_scale
        L = (1 - a) * L + a * L * attention
        mlp = norms[f"mlp_out{l}"] * norms[f"mlp_in{l}"] / GELU_DIVISOR
        L = (1 - a) * L + a * L * mlp
    return L * norms["out"]

