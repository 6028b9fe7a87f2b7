"""The local certificate: how far a network's activations can move within an l2 ball around one
input, from the activations that input really reaches (docs/certificate.md §9). Pure torch, float64.

The global certificate bounds every piece at the worst activation any input of the domain could
give it. Around one image most of that never happens: its tokens' queries and keys are what they
are, its attention weights are what they are. ``Reach`` carries, layer by layer, the activations of
the input itself (the centre) and two bounds on how far any input of the ball moves them: per token
(``token``, l2 over the width) and over the whole sequence (``total``, Frobenius). Linear maps and
the MLP multiply both by their norms; attention's bounds are computed from the centre's own queries,
keys, values and attention weights. The mean over tokens is then bounded by ``total / sqrt(N)``:
what a per-token (largest-token) bound cannot see, since an l2 ball cannot move every patch by its
whole radius at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lipschitz_lightning.core.bounds import GELU_DIVISOR, GELU_MAX_SLOPE
from lipschitz_lightning.models.gpt import ATTENTION_OUTPUT_SCALE, apply_rotary


@dataclass(frozen=True)
class Reach:
    """Activations ``(batch, N, d)`` of the centre and bounds for every input of the ball:
    ``||X'_t - X_t||_2 <= token[:, t]`` and ``||X' - X||_F <= total``."""

    center: Tensor
    token: Tensor  # (batch, N)
    total: Tensor  # (batch,)

    def linear(self, weight: Tensor) -> Reach:
        sigma = spectral_norm(weight)
        return Reach(self.center @ weight.T, sigma * self.token, sigma * self.total)

    def mixed(self, branch: Reach, a: float) -> Reach:
        """``(1 - a) X + a branch(X)``: the triangle inequality on both bounds."""
        keep = abs(1 - a)
        return Reach(keep * self.center + a * branch.center, keep * self.token + a * branch.token,
                     keep * self.total + a * branch.total)


@dataclass(frozen=True)
class VitReach:
    logits: Tensor  # (batch, classes) of the centre
    pooled: Tensor  # (batch,): ||pooled' - pooled||_2 for every image of the ball
    blocks: list[Reach]  # after each block


def spectral_norm(weight: Tensor) -> Tensor:
    """sigma_max in l2 (not RMS) units, from the exact SVD in float64."""
    return torch.linalg.matrix_norm(weight.double(), ord=2)


def finite_spectral_norm(matrices: Tensor) -> Tensor:
    """sigma_max of each matrix of a stack, inf for one with an entry that is not finite (which LAPACK refuses)."""
    finite = torch.isfinite(matrices).all(dim=-1).all(dim=-1)
    return torch.where(finite, torch.linalg.matrix_norm(torch.where(finite[..., None, None], matrices, 0.0), ord=2), math.inf)


def attention_reach(attention, x: Reach, rotary: tuple[Tensor, Tensor], causal: bool) -> Reach:
    """The attention branch's ``Reach`` (``models.gpt.Attention``; docs/certificate.md §9 derives each line).

    Per head, with the centre's queries ``q_t``, keys ``k_s``, values ``v_s``, weights ``p_ts``, outputs
    ``y_t``, and ``rho`` the per-token bounds carried through the head's rows:

    - scores move by ``|dS_ts| <= lambda_ts = c (|q_t| rho_k_s + rho_q_t |k_s| + rho_q_t rho_k_s)``, so every
      weight stays within ``p_ts e^(+-(lambda_ts + Lambda_t))``, ``Lambda_t = max_s lambda_ts``: ``p_hat`` above;
    - ``y'_t - y_t = sum_s p'_ts dv_s + sum_s (p'_ts - p_ts)(v_s - y_t)``: a convex combination of the
      values' moves (value path) and the weights' move against the values' spread (score path), the
      latter ``<= alpha_t |dq_t| + sum_s M_ts |dk_s|`` by the softmax's derivative along the segment.
    """
    c, (cos, sin) = x.center, rotary
    batch, n, d = c.shape
    heads, head_dim, scale = attention.num_heads, attention.head_dim, attention.scale

    def per_head(weight: Tensor) -> tuple[Tensor, Tensor]:
        """The centre's projection ``(batch, H, N, d_h)`` and each head's rows' sigma ``(H,)``."""
        projected = (c @ weight.T).view(batch, n, heads, head_dim).transpose(1, 2)
        return projected, torch.linalg.matrix_norm(weight.view(heads, head_dim, d), ord=2)

    (q, sigma_q), (k, sigma_k), (v, sigma_v) = (per_head(p.weight.double()) for p in (attention.q, attention.k, attention.v))
    q, k = apply_rotary(q, cos.double(), sin.double()), apply_rotary(k, cos.double(), sin.double())  # rotations: norms kept
    rho_q, rho_k, rho_v = (sigma[None, :, None] * x.token[:, None, :] for sigma in (sigma_q, sigma_k, sigma_v))

    scores = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones(n, n, dtype=torch.bool, device=c.device)
    if causal:
        allowed = allowed.tril()
    p = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)
    y = p @ v
    q_norm, k_norm = q.norm(dim=-1), k.norm(dim=-1)
    moved = scale * (q_norm[..., :, None] * rho_k[..., None, :] + rho_q[..., :, None] * k_norm[..., None, :]
                     + rho_q[..., :, None] * rho_k[..., None, :])
    moved = moved.masked_fill(~allowed, 0.0)
    # 0 * inf (a weight that underflowed, a bound that overflowed) counts as inf: the caller falls back
    # on the global certificate wherever this one is not finite
    p_hat = torch.nan_to_num(p * torch.exp(moved + moved.amax(dim=-1, keepdim=True)), nan=math.inf)
    # (batch, H, t, s): ||v_s - y_t||, differences taken one by one (the Gram form would cancel)
    spread = torch.cdist(y, v, compute_mode="donot_use_mm_for_euclid_dist")
    spread_mean = (p_hat * spread).sum(dim=-1)
    weighted = p_hat * (spread + spread_mean[..., None])
    alpha = scale * (weighted * (k_norm + rho_k)[..., None, :]).sum(dim=-1)  # (batch, H, t)
    M = scale * q_norm[..., :, None] * weighted  # (batch, H, t, s)

    value_path = torch.minimum((p_hat @ rho_v[..., None])[..., 0], rho_v.amax(dim=-1, keepdim=True))
    score_path = alpha * rho_q + (M @ rho_k[..., None])[..., 0]
    head_token = value_path + score_path  # (batch, H, N)
    token = head_token.pow(2).sum(dim=1).sqrt()

    # over the sequence, the heads share each token's energy (sum_h ||W^h u||^2 <= sigma(W)^2 ||u||^2)
    largest_column = p_hat.sum(dim=-2).amax(dim=-1).amax(dim=-1)  # ||P'||_1 bound; ||P'||_inf = 1
    total = (largest_column.sqrt() * spectral_norm(attention.v.weight) + alpha.flatten(1).amax(dim=1) * spectral_norm(attention.q.weight)
             + finite_spectral_norm(M).amax(dim=1) * spectral_norm(attention.k.weight)) * x.total
    total = torch.minimum(total, head_token.pow(2).sum(dim=(1, 2)).sqrt())

    merged = y.transpose(1, 2).reshape(batch, n, d) * ATTENTION_OUTPUT_SCALE
    return Reach(merged, ATTENTION_OUTPUT_SCALE * token, ATTENTION_OUTPUT_SCALE * total).linear(attention.out.weight.double())


def mlp_reach(mlp, x: Reach) -> Reach:
    """``down(gelu(up x) / 1.1289)``: GeLU's largest slope over 1.1289 times the two norms."""
    up = x.linear(mlp.up.weight.double())
    slope = GELU_MAX_SLOPE["tanh" if mlp.approximate == "tanh" else "exact"] / GELU_DIVISOR
    activated = Reach(F.gelu(up.center, approximate=mlp.approximate) / GELU_DIVISOR, slope * up.token, slope * up.total)
    return activated.linear(mlp.down.weight.double())


def block_reach(block, x: Reach, rotary: tuple[Tensor, Tensor], causal: bool) -> Reach:
    """One of the GPT's blocks (no layer-norm substitute: the ViT's and the paper's)."""
    x = x.mixed(attention_reach(block.attention, x, rotary, causal), block.mix)
    return x.mixed(mlp_reach(block.mlp, x), block.mix)


@torch.no_grad()
def vit_reach(net, images: Tensor, radius: float) -> VitReach:
    """The ``Reach`` of a ``models.vit.ViT`` around each image for every image within l2 ``radius``
    (pixels; the ball is not clipped to ``[0, 1]``): a patch moves by at most ``radius``, and all of them
    together by at most ``radius`` in l2, so the embedding's tokens by ``sigma(P)`` times that."""
    x = images.double()
    sigma = spectral_norm(net.patch.weight)
    center = net.patches(x) @ net.patch.weight.double().T
    batch, n = center.shape[:2]
    reach = Reach(center, torch.full((batch, n), float(sigma * radius), dtype=torch.float64, device=x.device),
                  torch.full((batch,), float(sigma * radius), dtype=torch.float64, device=x.device))
    rotary = (net.rotary_cos, net.rotary_sin)
    after = []
    for block in net.blocks:
        reach = block_reach(block, reach, rotary, causal=False)
        after.append(reach)
    if net.config.pool == "mean":
        pooled = torch.minimum(reach.token.mean(dim=1), reach.total / math.sqrt(n))
    else:  # the tokens side by side: their moves' 2-norm, or the sequence's
        pooled = torch.minimum(reach.token.norm(dim=1), reach.total)
    pooled = torch.nan_to_num(pooled, nan=math.inf)  # inf * 0 past an overflow: no bound here, the global one holds
    logits = (net.pooled(reach.center) @ net.head.weight.double().T) * net.config.final_scale
    return VitReach(logits, pooled, after)


def covers_gpt(net) -> bool:
    """Whether ``gpt_reach`` covers this GPT: its mask plain causal, no layer-norm substitute."""
    cfg = net.config
    return cfg.document_token is None and cfg.window_pattern is None and cfg.layernorm_substitute == "none"


@torch.no_grad()
def gpt_reach(net, tokens: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """A ``models.gpt.GPT``'s logits ``(batch, T, vocab)`` at the embedded ``tokens`` and, per position, a
    bound on how far its last features move (l2) for every input within token-RMS distance ``radius``
    of them (each token vector moved by at most ``sqrt(d) radius`` in l2). The plain causal mask only
    (no documents, no window) and no layer-norm substitute: ``LocalNotSupported`` otherwise."""
    if not covers_gpt(net):
        raise LocalNotSupported("the local certificate covers the plain causal GPT (no document mask, no window, no layer-norm substitute)")
    x = net.embed(tokens).double()
    batch, n, d = x.shape
    move = radius * math.sqrt(d)
    reach = Reach(x, torch.full((batch, n), move, dtype=torch.float64, device=x.device),
                  torch.full((batch,), move * math.sqrt(n), dtype=torch.float64, device=x.device))
    for block in net.blocks:
        reach = block_reach(block, reach, (net.rotary_cos, net.rotary_sin), causal=True)
    return net.logits(reach.center), torch.nan_to_num(reach.token, nan=math.inf)  # past an overflow: no local bound


class LocalNotSupported(ValueError):
    """A network the local certificate does not cover: the message says what it covers."""
