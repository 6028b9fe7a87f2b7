"""Post-training weight quantization, and certified bounds on how far rounding can move the logits.
Pure torch; derived step by step in docs/quantization.md.

The quantizers round and dequantize ("fake quantization"): the network keeps float32 weights that
hold exactly the values a low-precision kernel would use, and a bound speaks of exactly those:

- ``int8``: symmetric, one scale per output channel (row of ``W``): ``amax(row) / 127``, codes -127..127;
- ``fp8``: float8 e4m3 with one per-tensor scale ``amax / 448`` (``robustness.precision.cast_tensor``,
  what ``certify`` reports);
- ``int4``: symmetric, one scale per group of ``group`` (128) consecutive inputs of a row:
  ``amax(group) / 7``, codes -7..7;
- ``fp8_act``: the fp8 weights, and the input of every linear layer rounded to e4m3 with a dynamic
  scale per row (per token, per image: ``Fp8Linear``, ``torch._scaled_mm``'s row-wise scaling where it
  runs, else the same products simulated in float32). A scale per row, not per tensor: with one
  scale for a whole batch, a small input beside a large one loses its activations to rounding, and
  no bound on one input could hold whatever the rest of its batch holds.

An embedding table is rounded like a matrix whose rows are its token vectors.

The bounds telescope over the layers (blocks): the network as deployed up to a layer, the float
network after it. With ``E_i = W~_i - W_i`` and all norms RMS->RMS (SPEC §2):

- MLP (``mlp_rounding_bound``): ``rms(f~(x) - f(x)) <= |c| sum_i (prod_{j>i} ||W_j||) (||E_i|| A_{i-1} + ||W~_i|| alpha_{i-1})``
  with ``A_0 = rms(x - input_shift)`` (what the first layer sees), ``A_i = ||W~_i|| (A_{i-1} + alpha_{i-1})``
  and ``alpha`` the fp8 rounding of a layer's input (0 without activation rounding);
- GPT (``gpt_rounding_bound``): the embedding's rounding through the float network's certificate,
  each block's error (the mean-value inequality in weight space, docs/quantization.md §4) through the
  certificate of the blocks after it, and the head's error; with fp8 activations every matrix's
  norm and error grow by the rounding of its input (``activation_rounded``).

Both every-input bounds speak of the rounded network in exact arithmetic (its float32 arithmetic,
like the certificate's, is outside them); ``classifier_rounding`` and ``language_model_rounding``
(what ``quantize`` runs) check them on data against the rounded network evaluated in float64
(``Fp8Linear`` runs in float64 too).

``*_per_input`` replace every worst case of a layer's error by the difference the deployed network
actually made on an input (computed in float64 beside the float network): a certificate for that
input, which covers everything the deployed network computes (activation rounding, float32
arithmetic) since it measures it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import (
    GELU_DIVISOR,
    GELU_MAX_SLOPE,
    UNCERTIFIABLE_SUBSTITUTES,
    embedding_norm,
    gpt_certificate,
    rms_norm,
)
from lipschitz_lightning.errors import CertificateBroken, DataError
from lipschitz_lightning.robustness.certified import SLACK
from lipschitz_lightning.robustness.precision import FLOAT8_MAX, cast_tensor, frozen

FP8 = torch.float8_e4m3fn
TINY = torch.finfo(torch.float32).tiny

# Rounding to e4m3 with the per-tensor scale s = amax / 448, as Fp8Linear does it in float32
# (docs/quantization.md §1): |Q(z) - z| <= FP8_RELATIVE |z| + FP8_ABSOLUTE * amax / 448 per entry.
# e4m3 keeps 3 mantissa bits (relative rounding 2^-4 among normal numbers); below its smallest normal
# 2^-6 the spacing is 2^-9 (absolute rounding 2^-10 in units of s). The float32 division by s, the
# float32 product with s and s's own rounding add the 2^-22 terms.
FP8_RELATIVE = 2**-4 + 2**-22
FP8_ABSOLUTE = 2**-10 * (1 + 2**-22)


# --------------------------------------------------------------------------------------------
# The quantizers: round, dequantize
# --------------------------------------------------------------------------------------------


def int8_per_row(W: Tensor) -> Tensor:
    """Symmetric int8, one scale per row (output channel): ``round(W / s) * s``, ``s = amax(row) / 127``."""
    scale = W.abs().amax(dim=-1, keepdim=True) / 127
    return (W / scale.clamp(min=TINY)).round().clamp(-127, 127) * scale


def int4_groups(W: Tensor, group: int = 128) -> Tensor:
    """Symmetric int4 in groups of ``group`` consecutive inputs of each row (the last group of a row
    may be shorter): ``round(W / s) * s``, ``s = amax(group) / 7``, codes -7..7."""
    rows, fan_in = W.shape
    padded = F.pad(W, (0, (-fan_in) % group)).view(rows, -1, group)
    scale = padded.abs().amax(dim=-1, keepdim=True) / 7
    rounded = (padded / scale.clamp(min=TINY)).round().clamp(-7, 7) * scale
    return rounded.view(rows, -1)[:, :fan_in]


def fp8_per_tensor(W: Tensor) -> Tensor:
    """float8 e4m3 with the per-tensor scale ``amax / 448`` (the same rounding as ``certify``'s)."""
    return cast_tensor(W, FP8)


def fp8_round(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as e4m3 codes and the per-tensor scale ``amax / 448``: ``codes * scale`` is the
    rounded tensor."""
    scale = x.abs().amax().clamp(min=TINY) / FLOAT8_MAX
    return (x / scale).to(FP8), scale


def fp8_round_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Every row of ``x`` (float32 or float64) as e4m3 codes and its own scale ``amax(row) / 448``
    (shape ``(rows, 1)``): ``codes * scale`` is the rounded tensor."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=TINY) / FLOAT8_MAX
    return (x / scale).to(FP8), scale


def fp8_activation_rounding(width: int) -> float:
    """``kappa`` with ``rms(Q(z) - z) <= kappa * rms(z)`` for a row ``z`` of ``width`` entries rounded to
    e4m3 with its own scale (docs/quantization.md §1): the row's amax is at most ``sqrt(width)`` times
    its RMS. It holds for rows whose largest entry is 0 or at least ``448 * 2^-126`` (~5.3e-36), where
    the scale is a normal float32."""
    return FP8_RELATIVE + FP8_ABSOLUTE * math.sqrt(width) / FLOAT8_MAX


class Fp8Linear(nn.Module):
    """A bias-free linear layer with e4m3 weights (per-tensor scale) that rounds its input to e4m3
    with a dynamic scale per row (``fp8_round_rows``) and multiplies the codes with
    ``torch._scaled_mm`` (row-wise scales, exact products, float32 accumulation). Where
    ``_scaled_mm`` refuses (a device without fp8 matrix units, CUDA's multiple-of-16 shapes), the same
    rounded operands are multiplied in float32: ``kernel`` says which ran. In float64 (the module
    converted with ``.double()``) it computes the same rounding with float64 products: the rounded
    network in exact arithmetic, what the every-input bounds speak of. ``weight`` is the dequantized
    weight, for the bounds."""

    def __init__(self, weight: Tensor):
        super().__init__()
        codes, scale = fp8_round(weight.detach().float())
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("weight", codes.float() * scale)
        self.kernel = "torch._scaled_mm"  # until it refuses once; then "simulated"

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.weight.dtype == torch.float64:
            codes, scale = fp8_round_rows(flat.double())
            return ((codes.double() * scale) @ self.weight.t()).reshape(*x.shape[:-1], -1)
        codes, scale = fp8_round_rows(flat.float())
        if self.kernel == "torch._scaled_mm":
            try:
                y = torch._scaled_mm(codes, self.codes.t(), scale_a=scale,
                                     scale_b=self.scale.reshape(1, 1).expand(1, self.codes.shape[0]).contiguous(),
                                     out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError):
                self.kernel = "simulated"
        if self.kernel == "simulated":
            y = (codes.float() * scale) @ self.weight.t()
        return y.reshape(*x.shape[:-1], -1)


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    weights: Callable[[Tensor], Tensor]  # W -> the dequantized rounded W (same shape and dtype)
    activations: bool = False  # the input of every linear layer rounded to fp8 e4m3 (Fp8Linear)


def schemes(int4_group: int = 128) -> dict[str, Scheme]:
    return {s.name: s for s in (
        Scheme("int8", "int8 weights, symmetric, per output channel", int8_per_row),
        Scheme("fp8", "fp8 e4m3 weights, per-tensor amax scale", fp8_per_tensor),
        Scheme("int4", f"int4 weights, symmetric, groups of {int4_group} inputs", partial(int4_groups, group=int4_group)),
        Scheme("fp8_act", "fp8 e4m3 weights and fp8 e4m3 inputs to every linear layer (dynamic scale per row)",
               fp8_per_tensor, activations=True),
    )}


SCHEME_NAMES = ("int8", "fp8", "int4", "fp8_act")


@torch.no_grad()
def quantized(net: nn.Module, scheme: Scheme) -> nn.Module:
    """A copy of ``net`` (float32) with every linear layer's and embedding's weight rounded by
    ``scheme``; with activation rounding, every ``nn.Linear`` replaced by an ``Fp8Linear``."""
    deployed = copy.deepcopy(net).float().eval()
    for module in list(deployed.modules()):
        if isinstance(module, nn.Embedding):
            module.weight.copy_(scheme.weights(module.weight))
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child.bias is not None:
                raise ValueError(f"{name}: a linear layer with a bias; the networks here have none and the bounds assume none")
            if scheme.activations:
                setattr(module, name, Fp8Linear(child.weight))
            else:
                child.weight.copy_(scheme.weights(child.weight))
    return deployed


def kernels(deployed: nn.Module) -> list[str]:
    """Which matrix product the ``Fp8Linear`` layers of ``deployed`` ran (empty without any)."""
    return sorted({m.kernel for m in deployed.modules() if isinstance(m, Fp8Linear)})


def error_norm(W: Tensor, rounded: Tensor) -> float:
    """``||W~ - W||`` in RMS->RMS units, the difference formed in float64 (exact for float32 weights)."""
    return rms_norm(rounded.detach().double() - W.detach().double())


def token_rms_max(x: Tensor) -> Tensor:
    """A sequence's norm (docs/certificate.md §0): its largest token RMS, per sequence."""
    return x.pow(2).mean(dim=-1).sqrt().amax(dim=-1)


# --------------------------------------------------------------------------------------------
# The MLP (docs/quantization.md §2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundingBound:
    """``bound`` on ``rms(f~(x) - f(x))`` (RMS over the logits) for every input of RMS at most
    ``input_rms`` (the MLP) or every token sequence (the GPT), and its terms, one per layer or block."""

    bound: float
    terms: dict[str, float]
    input_rms: float
    covers: str  # "weights" or "weights and activations"


def mlp_rounding_bound(norms: Sequence[float], rounded_norms: Sequence[float], error_norms: Sequence[float], *,
                       final_scale: float = 1.0, input_rms: float = 1.0,
                       activation_rounding: Sequence[float] | None = None) -> RoundingBound:
    """The bias-free ReLU MLP ``c W_n relu(... relu(W_1 x))`` against its rounded copy, input first.

    Layer ``i``'s term is ``|c| (prod_{j>i} ||W_j||) (||E_i|| A_{i-1} + ||W~_i|| alpha_{i-1})``: the
    deployed network up to layer ``i``, the float network after it (Lipschitz ``|c| prod_{j>i} ||W_j||``,
    ReLU being 1-Lipschitz). ``A`` bounds the RMS of the deployed network's activations
    (``|relu(z)| <= |z|``) and ``alpha_{i-1} = kappa_i A_{i-1}`` their fp8 rounding, with
    ``activation_rounding[i] = kappa_i`` (``fp8_activation_rounding`` of layer ``i``'s input width).
    """
    A, terms = input_rms, {}
    for i, (error, rounded) in enumerate(zip(error_norms, rounded_norms)):
        downstream = abs(final_scale) * math.prod(norms[i + 1:])
        alpha = activation_rounding[i] * A if activation_rounding is not None else 0.0
        terms[f"layers.{i}"] = downstream * (error * A + rounded * alpha)
        A = rounded * (A + alpha)
    covers = "weights" if activation_rounding is None else "weights and activations"
    return RoundingBound(sum(terms.values()), terms, input_rms, covers)


def mlp_rounding_bound_of(net: nn.Module, deployed: nn.Module, scheme: Scheme, input_rms: float = 1.0) -> RoundingBound:
    """``mlp_rounding_bound`` for a ``models.MLP`` and its ``quantized`` copy, for first-layer inputs
    (``first_layer_input``) of RMS at most ``input_rms``."""
    weights = [layer.weight for layer in net.layers]
    rounded = [layer.weight for layer in deployed.layers]
    kappa = [fp8_activation_rounding(W.shape[1]) for W in weights] if scheme.activations else None
    return mlp_rounding_bound([rms_norm(W) for W in weights], [rms_norm(W) for W in rounded],
                              [error_norm(W, R) for W, R in zip(weights, rounded)],
                              final_scale=net.final_scale, input_rms=input_rms, activation_rounding=kappa)


def first_layer_input(net: nn.Module, x: Tensor) -> Tensor:
    """What a ``models.MLP``'s first layer sees, exactly (float64): the flattened input minus its
    ``input_shift``. The every-input bound is linear in its RMS."""
    return x.flatten(1).double() - net.input_shift


def first_layer_input_rms_max(net: nn.Module) -> float:
    """The largest RMS of ``first_layer_input`` over images in ``[0, 1]^n``: ``max(shift, 1 - shift)``
    (every pixel at the end farther from the shift)."""
    return max(net.input_shift, 1.0 - net.input_shift)


@torch.no_grad()
def mlp_per_input(net64: nn.Module, deployed: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """For a batch of inputs: the deployed network's logits (float32, as deployed) and the per-input
    certified bound on ``rms(f~(x) - f(x))`` against the float network ``net64`` (float64).

    Layer ``i``'s term is the float tail's Lipschitz bound times ``rms(z~_i - W_i h~_{i-1})``: what the
    deployed layer computed on the input it received minus what the float layer computes on it (in
    float64), so activation rounding and float32 arithmetic are inside the measured differences. The
    first term is the whole float network's bound times how far the first layer's input is from the
    exact ``x - input_shift`` (the deployed network subtracts the shift in float32).
    """
    seen: list[tuple[Tensor, Tensor]] = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for layer in deployed.layers]
    try:
        logits = deployed(x)
    finally:
        for hook in hooks:
            hook.remove()
    weights = [layer.weight.double() for layer in net64.layers]
    norms = [rms_norm(W) for W in weights]
    c = net64.final_scale
    bound = abs(c) * math.prod(norms) * rms(seen[0][0].double() - first_layer_input(net64, x))
    for i, ((h, z), W) in enumerate(zip(seen, weights)):
        exact = h.double() @ W.T
        if i < len(weights) - 1:
            bound += abs(c) * math.prod(norms[i + 1:]) * rms(z.double() - exact)
        else:  # the last layer: the deployed logits against c W_n h~
            bound += rms(logits.double() - c * exact)
    return logits, bound


def rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(dim=-1).sqrt()


# --------------------------------------------------------------------------------------------
# The GPT (docs/quantization.md §3-§5)
# --------------------------------------------------------------------------------------------

BLOCK_MATRICES = ("q", "k", "v", "w", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class GPTShape:
    """What the bounds need of a ``GPTConfig``."""

    num_blocks: int
    num_heads: int
    softmax_scale: float = 1.0
    residual_scale: float = 1.0
    final_scale: float = 1.0
    layernorm_substitute: str = "none"
    gelu: str = "tanh"
    embed_max_rms: float | None = None

    @classmethod
    def of(cls, config) -> GPTShape:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def downstream_lipschitz(norms: Mapping[str, float], shape: GPTShape, first: int, radius: float) -> float:
    """The certificate (docs/certificate.md) of blocks ``first..L-1`` and the head, on inputs of token
    RMS at most ``radius``: ``gpt_certificate`` of that sub-network. Its residual mix must stay
    ``a = residual_scale / (2 L)`` of the whole network, so it gets ``residual_scale * rest / L``."""
    L, rest = shape.num_blocks, shape.num_blocks - first
    if rest == 0:
        return norms["out"] * abs(shape.final_scale)
    sub = {f"{name}{l - first}": norms[f"{name}{l}"] for l in range(first, L) for name in BLOCK_MATRICES}
    return gpt_certificate(
        {**sub, "out": norms["out"]}, num_blocks=rest, num_heads=shape.num_heads, softmax_scale=shape.softmax_scale,
        residual_scale=shape.residual_scale * rest / L, final_scale=shape.final_scale,
        layernorm_substitute=shape.layernorm_substitute, gelu=shape.gelu, input_radius=radius,
    ).bound


def embedding_radius(embed_norms: Sequence[float], shape: GPTShape) -> float:
    """``R``: the largest token RMS the float and the rounded embedding can produce, at least 1 (the
    lookup caps it at ``embed_max_rms`` when set)."""
    largest = max(embed_norms)
    if shape.embed_max_rms is not None:
        largest = min(largest, shape.embed_max_rms)
    return max(1.0, largest)


def block_rounding_error(norms: Mapping[str, float], rounded: Mapping[str, float], errors: Mapping[str, float],
                         shape: GPTShape, l: int, radius: float) -> float:
    """Bound on ``||B~_l(X) - B_l(X)||`` (largest token RMS) for every input ``X`` of token RMS at most
    ``radius``: block ``l`` with rounded against float weights (docs/quantization.md §4)."""
    squash = shape.layernorm_substitute == "tanh"
    a = shape.residual_scale / (2 * shape.num_blocks)
    keep, s, H = abs(1 - a), abs(shape.softmax_scale), shape.num_heads
    q, k, v, w, i, o = (norms[f"{name}{l}"] for name in BLOCK_MATRICES)
    Eq, Ek, Ev, Ew, Ei, Eo = (errors[f"{name}{l}"] for name in BLOCK_MATRICES)
    q_, k_, v_, w_, i_, o_ = (max(norms[f"{n}{l}"], rounded[f"{n}{l}"]) for n in BLOCK_MATRICES)  # along W + tE

    r_in = min(radius, 1.0) if squash else radius
    attention = (r_in / 3) * (Ew * math.sqrt(H) * rounded[f"v{l}"]
                              + w * (math.sqrt(H) * Ev + s * H * v_ * r_in**2 * (k_ * Eq + q_ * Ek)))
    r_mid = keep * radius + a * (w_ / 3) * math.sqrt(H) * v_ * r_in  # the attention mix's output, float or rounded
    m_in = min(r_mid, 1.0) if squash else r_mid
    slope = GELU_MAX_SLOPE[shape.gelu] / GELU_DIVISOR
    mlp = (Eo * rounded[f"mlp_in{l}"] / GELU_DIVISOR + o * slope * Ei) * m_in
    return (keep + a * o * i * slope) * a * attention + a * mlp


def activation_rounded(rounded: Mapping[str, float], errors: Mapping[str, float],
                       activation_rounding: Mapping[str, float]) -> tuple[dict, dict]:
    """A matrix whose input is rounded (``rms(Q(z) - z) <= kappa rms(z)``, fp8 per row) acts like a
    matrix of norm ``||W~|| (1 + kappa)`` off by ``||E|| + kappa ||W~||`` from the float one:
    ``W~ Q(z) - W z = E z + W~ (Q(z) - z)`` (docs/quantization.md §4). The norms and errors of the
    matrices named in ``activation_rounding``, so grown; the others as they are."""
    grown, off = dict(rounded), dict(errors)
    for name, kappa in activation_rounding.items():
        grown[name] = rounded[name] * (1 + kappa)
        off[name] = errors[name] + kappa * rounded[name]
    return grown, off


@dataclass(frozen=True)
class GPTRoundingBound:
    """``bound`` on the largest token RMS of ``f~(tokens) - f(tokens)`` (RMS over the vocabulary) for
    every token sequence: the embedding's term, each block's, the head's (docs/quantization.md §5).
    ``weights_part`` (blocks and head) bounds ``||f~(X) - f(X)||`` for every input ``X`` after the
    embedding of token RMS at most ``input_radius``."""

    bound: float
    embedding: float
    blocks: tuple[float, ...]
    head: float
    input_radius: float
    activation_rms: tuple[float, ...]  # the radii the terms use: block outputs, float or rounded
    covers: str = "weights"  # or "weights and activations"

    @property
    def weights_part(self) -> float:
        return sum(self.blocks) + self.head


def gpt_rounding_bound(norms: Mapping[str, float], rounded: Mapping[str, float], errors: Mapping[str, float],
                       shape: GPTShape, activation_rounding: Mapping[str, float] | None = None) -> GPTRoundingBound:
    """Weight rounding in the Modula GPT, from RMS->RMS norms (``embed``: the largest token RMS) of the
    float weights, the rounded ones and their differences (``errors["embed"]``: the largest token RMS
    of the embedding's difference). ``activation_rounding``: each matrix's ``kappa`` when its input is
    rounded too (fp8 activations; ``activation_rounded``)."""
    covers = "weights" if activation_rounding is None else "weights and activations"
    if shape.layernorm_substitute in UNCERTIFIABLE_SUBSTITUTES:
        inf = (math.inf,) * shape.num_blocks
        return GPTRoundingBound(math.inf, math.inf, inf, math.inf, math.inf, inf, covers)
    if activation_rounding is not None:
        rounded, errors = activation_rounded(rounded, errors, activation_rounding)
    R = embedding_radius([norms["embed"], rounded["embed"]], shape)
    largest = {name: max(norms[name], rounded[name]) for name in norms}
    radii = gpt_certificate(largest, num_blocks=shape.num_blocks, num_heads=shape.num_heads,
                            softmax_scale=shape.softmax_scale, residual_scale=shape.residual_scale,
                            layernorm_substitute=shape.layernorm_substitute, gelu=shape.gelu,
                            input_radius=R).activation_rms
    embedding = downstream_lipschitz(norms, shape, 0, R) * errors["embed"]
    blocks = tuple(
        downstream_lipschitz(norms, shape, l + 1, radii[l]) * block_rounding_error(norms, rounded, errors, shape, l, r)
        for l, r in enumerate((R, *radii[:-1]))
    )
    head = abs(shape.final_scale) * errors["out"] * radii[-1]
    return GPTRoundingBound(embedding + sum(blocks) + head, embedding, blocks, head, R, tuple(radii), covers)


def gpt_norms(net: nn.Module, deployed: nn.Module) -> tuple[dict, dict, dict]:
    """The float norms, the rounded ones and the errors' of a GPT and its ``quantized`` copy."""
    float_weights, rounded_weights = net.named_matrices(), deployed.named_matrices()
    errors = {name: error_norm(W, rounded_weights[name]) for name, W in float_weights.items()}
    errors["embed"] = embedding_norm(deployed.embedding.weight.double() - net.embedding.weight.double())
    return net.layer_norms(), deployed.layer_norms(), errors


def gpt_rounding_bound_of(net: nn.Module, deployed: nn.Module, activations: bool = False) -> GPTRoundingBound:
    """``gpt_rounding_bound`` of a GPT and its ``quantized`` copy; ``activations``: every linear
    layer's input rounded to fp8 as well (the ``fp8_act`` scheme), each with its fan-in's ``kappa``."""
    kappa = None
    if activations:
        kappa = {name: fp8_activation_rounding(W.shape[1]) for name, W in net.named_matrices().items()}
    return gpt_rounding_bound(*gpt_norms(net, deployed), GPTShape.of(net.config), kappa)


@torch.no_grad()
def gpt_per_input(net64: nn.Module, deployed: nn.Module, tokens: Tensor, window=None) -> tuple[Tensor, Tensor]:
    """For a batch of token sequences: the deployed logits ``(batch, seq, vocab)`` (float32, as
    deployed) and per sequence the certified bound on the largest token RMS of their difference from
    the float network ``net64``'s (float64). The bound of ``gpt_rounding_bound`` on these sequences, each worst case replaced by what the
    deployed network did (docs/quantization.md §6): its embedding against the float one, each of its
    blocks against the float block on the same (deployed) input, its head against the float head, each
    difference times the float network's certificate downstream on the ball both sides lie in."""
    seen: list[tuple[tuple, Tensor]] = []
    hooks = [block.register_forward_hook(lambda m, args, out: seen.append((args, out))) for block in deployed.blocks]
    try:
        features = deployed.features(tokens, window=window)
    finally:
        for hook in hooks:
            hook.remove()
    logits = deployed.logits(features)
    shape = GPTShape.of(net64.config)
    norms = net64.layer_norms()

    def lipschitz(first: int, a: Tensor, b: Tensor) -> Tensor:
        radius = torch.maximum(token_rms_max(a), token_rms_max(b))
        return torch.tensor([downstream_lipschitz(norms, shape, first, float(r)) for r in radius], dtype=torch.float64)

    exact_input = net64.embed(tokens)
    deployed_input = seen[0][0][0].double()
    bound = lipschitz(0, deployed_input, exact_input) * token_rms_max(deployed_input - exact_input)
    rotary = (net64.rotary_cos, net64.rotary_sin)
    for l, ((x, _, mask, _, name), out) in enumerate(seen):
        float_block = net64.blocks[l](x.double(), rotary, mask, None, name)
        bound += lipschitz(l + 1, out.double(), float_block) * token_rms_max(out.double() - float_block)
    bound += token_rms_max(logits.double() - net64.logits(features.double()))
    return logits, bound


# ----------------------------------------------------------------------------- on data (quantize)
#
# Every scheme of a network on validation data: loss and accuracy, rounded against float32, and the
# certificate's promises checked input by input. A promise broken raises ``errors.CertificateBroken``.


def top_two_margin(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The prediction and its margin over the runner-up (what a certified-unchanged prediction must clear)."""
    top = logits.topk(2, dim=-1).values
    return logits.argmax(dim=-1), top[..., 0] - top[..., 1]


class Tally:
    """One scheme's sums over the evaluated inputs (examples or positions)."""

    def __init__(self):
        self.count = self.loss = self.correct = self.changed = 0.0
        self.certified = self.certified_global = 0.0
        self.per_input: list[Tensor] = []
        self.observed_max = self.observed_over_bound = 0.0

    def add(self, logits: Tensor, targets: Tensor, reference_prediction: Tensor) -> None:
        flat = logits.reshape(-1, logits.shape[-1])
        self.count += targets.numel()
        self.loss += float(F.cross_entropy(flat.float(), targets.reshape(-1), reduction="sum"))
        prediction = flat.argmax(dim=-1)
        self.correct += int((prediction == targets.reshape(-1)).sum())
        self.changed += int((prediction != reference_prediction.reshape(-1)).sum())

    def add_certificates(self, certified: Tensor, certified_by_bound: Tensor, per_input: Tensor, observed: Tensor,
                         observed_over_bound: float) -> None:
        self.certified += int(certified.sum())
        self.certified_global += int(certified_by_bound.sum())
        self.per_input.append(per_input)
        self.observed_max = max(self.observed_max, float(observed.max()))
        self.observed_over_bound = max(self.observed_over_bound, observed_over_bound)

    def row(self) -> dict:
        return {"loss": self.loss / self.count, "accuracy": self.correct / self.count, "changed": self.changed / self.count}


def check_promises(where: str, scheme: str, observed: Tensor, bound: Tensor, certified: Tensor, prediction: Tensor,
                   exact_prediction: Tensor, which: str = "per-input") -> None:
    """A certificate's promises on this batch: no change above its bound, no prediction it certifies
    unchanged changed. ``which="per-input"``: the deployed network as it runs against the float64
    one; ``"every-input"``: the rounded network evaluated in float64, the exact arithmetic that bound
    speaks of."""
    of = "" if which == "per-input" else ", rounded network in float64"
    over = observed > bound * (1 + SLACK)
    if over.any():
        i = int(over.nonzero()[0, 0])
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: input {i} moved the logits by {float(observed[i]):.6g} "
                                f"(RMS{of}), above its certified bound {float(bound[i]):.6g} ({which})")
    flipped = certified & (prediction != exact_prediction)
    if flipped.any():
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: {int(flipped.sum())} predictions certified "
                                f"unchanged by rounding changed ({which} bound{of})")


def scheme_row(scheme: Scheme, tally: Tally, bound: float, covers: str, terms: dict, kernels: list[str], seconds: float,
               errors: dict) -> dict:
    """One scheme's row of ``quantize.json``."""
    per_input = torch.cat(tally.per_input)
    return tally.row() | {
        "description": scheme.description,
        "bound": bound, "bound_covers": covers, "bound_terms": terms,
        "per_input_median": float(per_input.median()), "per_input_max": float(per_input.max()),
        "observed_max": tally.observed_max, "observed_over_bound_max": tally.observed_over_bound,
        "certified_unchanged": tally.certified / tally.count, "certified_unchanged_by_bound": tally.certified_global / tally.count,
        "error_norms": errors, "activation_kernel": kernels[0] if len(kernels) == 1 else (kernels or None),
        "seconds": seconds,
    }


def classifier_rounding(net: nn.Module, x: Tensor, y: Tensor, chosen: Mapping[str, Scheme], batch: int, where: str) -> dict:
    """The MLP on the images ``x`` (``batch`` at a time): every scheme's accuracy, loss, bounds and
    certified fraction. ``where`` names the network in a ``CertificateBroken`` message."""
    net, net64 = frozen(net), frozen(net, torch.float64)
    classes = net.config["num_classes"]
    to_l2 = math.sqrt(2 * classes)  # a margin moves by at most sqrt(2) ||dz||_2 = sqrt(2 classes) rms(dz)
    deployed = {name: quantized(net, scheme) for name, scheme in chosen.items()}
    deployed64 = {name: frozen(rounded, torch.float64) for name, rounded in deployed.items()}
    # per unit RMS of what the first layer sees (the bound is linear in it: docs/quantization.md §2)
    bounds = {name: mlp_rounding_bound_of(net, deployed[name], scheme) for name, scheme in chosen.items()}
    reference, tallies, seconds = Tally(), {name: Tally() for name in chosen}, dict.fromkeys(chosen, 0.0)
    for xs, ys in zip(x.split(batch), y.split(batch)):
        with torch.no_grad():
            logits = net(xs)
            exact = net64(xs.double())
        exact_prediction, margin = top_two_margin(exact)
        prediction = logits.argmax(dim=-1)
        reference.add(logits, ys, prediction)
        input_rms = rms(first_layer_input(net64, xs))
        for name in chosen:
            started = time.perf_counter()
            rounded, per_input = mlp_per_input(net64, deployed[name], xs)
            seconds[name] += time.perf_counter() - started
            observed = rms(rounded.double() - exact)
            certified = margin > to_l2 * per_input
            check_promises(where, name, observed, per_input, certified, rounded.argmax(dim=-1), exact_prediction)
            every_input = bounds[name].bound * input_rms
            certified_by_bound = margin > to_l2 * every_input * (1 + SLACK)
            with torch.no_grad():
                rounded64 = deployed64[name](xs.double())
            check_promises(where, name, rms(rounded64 - exact), every_input, certified_by_bound, rounded64.argmax(dim=-1),
                           exact_prediction, which="every-input")
            tallies[name].add(rounded, ys, prediction)
            tallies[name].add_certificates(certified, certified_by_bound, per_input, observed,
                                           float((observed / every_input.clamp(min=1e-300)).max()))
    shift = net.input_shift
    domain = (f"every image in [0, 1]^{net.config['input_dim']}: the first layer sees x - {shift:g}, of RMS <= "
              f"{first_layer_input_rms_max(net):g}; per image, the bound times rms(x - {shift:g})") if shift else \
             f"every image in [0, 1]^{net.config['input_dim']} (RMS <= 1); per image, the bound times its RMS"
    return {
        "domain": domain,
        "float32": reference.row() | {"changed": 0.0},
        "schemes": {name: scheme_row(chosen[name], tallies[name], bounds[name].bound, bounds[name].covers, bounds[name].terms,
                                     kernels(deployed[name]), seconds[name],
                                     {f"layers.{i}": error_norm(a.weight, b.weight) for i, (a, b) in enumerate(zip(net.layers, deployed[name].layers))})
                    for name in chosen},
    }


def language_model_rounding(net: nn.Module, batches, chosen: Mapping[str, Scheme], max_batches: int, where: str) -> dict:
    """The GPT on at most ``max_batches`` of ``batches`` (``(tokens, targets)``): every position's
    next-token prediction. ``where`` names the network in an error's message."""
    net, net64 = frozen(net), frozen(net, torch.float64)
    window = net.window_blocks(1.0)
    to_l2 = math.sqrt(2 * net.config.vocab_size)
    deployed = {name: quantized(net, scheme) for name, scheme in chosen.items()}
    deployed64 = {name: frozen(rounded, torch.float64) for name, rounded in deployed.items()}
    bounds = {name: gpt_rounding_bound_of(net, deployed[name], scheme.activations) for name, scheme in chosen.items()}
    reference, tallies, seconds = Tally(), {name: Tally() for name in chosen}, dict.fromkeys(chosen, 0.0)
    evaluated = 0
    for index, (tokens, targets) in enumerate(batches):
        if index >= max_batches:
            break
        evaluated += 1
        with torch.no_grad():
            logits = net(tokens, window=window)
            exact = net64(tokens, window=window)
        exact_prediction, margin = top_two_margin(exact)
        prediction = logits.argmax(dim=-1)
        reference.add(logits, targets, prediction)
        for name in chosen:
            started = time.perf_counter()
            rounded, per_input = gpt_per_input(net64, deployed[name], tokens, window)
            seconds[name] += time.perf_counter() - started
            change = rms(rounded.double() - exact)  # (batch, seq): each position's logits
            observed = change.amax(dim=-1)
            certified = margin > to_l2 * per_input[:, None]
            check_promises(where, name, observed, per_input, certified, rounded.argmax(dim=-1), exact_prediction)
            every_input = torch.full_like(per_input, bounds[name].bound)
            certified_by_bound = margin > to_l2 * bounds[name].bound * (1 + SLACK)
            with torch.no_grad():
                rounded64 = deployed64[name](tokens, window=window)
            check_promises(where, name, rms(rounded64 - exact).amax(dim=-1), every_input, certified_by_bound,
                           rounded64.argmax(dim=-1), exact_prediction, which="every-input")
            tallies[name].add(rounded, targets, prediction)
            tallies[name].add_certificates(certified, certified_by_bound, per_input, observed,
                                           float(observed.max()) / bounds[name].bound)
    if not evaluated:
        raise DataError(f"{where}: the validation split gave no batch")
    rows = {}
    for name in chosen:
        b = bounds[name]
        terms = {"embedding": b.embedding, **{f"block{l}": t for l, t in enumerate(b.blocks)}, "head": b.head}
        errors = gpt_norms(net, deployed[name])[2]
        rows[name] = scheme_row(chosen[name], tallies[name], b.bound, b.covers, terms, kernels(deployed[name]), seconds[name], errors)
    return {
        "batches": evaluated, "positions": int(reference.count),
        "domain": f"every token sequence (inputs after the embedding of token RMS <= {bounds[next(iter(chosen))].input_radius:.4g})",
        "certified_lipschitz_bound": net.certified_bound(),
        "float32": reference.row() | {"changed": 0.0},
        "schemes": rows,
    }
