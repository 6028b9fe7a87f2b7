"""A Lipschitz vision transformer for CIFAR-10, built from the GPT's blocks (docs/certificate.md §8).
Read top to bottom:

    image (32, 32, 3), pixels in [0, 1], channels last as the datamodule gives them
      -> N = (32 / p)^2 patches of p x p pixels, each 3 p^2 values minus ``input_shift``
      -> patch embedding: one matrix (3 p^2 -> width), no bias
      -> L of the GPT's blocks, attention bidirectional, RoPE over the patches' raster order
      -> the tokens pooled: their mean (width), or all of them side by side (N width)
      -> head (-> classes) * final_scale

No layer norm, no class token, no bias, no learned position table: every piece's Lipschitz constant
follows from the weights' norms on a domain the images fill, so the logits have a certificate in
pixel space (``pairwise_l2_bound``), which the certified-margin loss trains against as for the MLP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import annotated_types as at
import torch
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import GPTCertificate, gpt_certificate, head_row_distances, rms_norm, rms_norm_on_device
from lipschitz_lightning.core.roles import ParamSpec, Role, gpt_target_norms
from lipschitz_lightning.core.types import Positive, PositiveInt
from lipschitz_lightning.models.gpt import GELUS, TARGET_NORMS, AttentionMask, Block, GPTConfig, orthogonal_, rotary_tables

# the kernels that train on a CPU (flex attention's backward is CUDA's only); both give the same bound
VIT_ATTENTION = ("sdpa", "explicit")
# mean: the head sees the tokens' mean; flatten: every token at its place (a position-aware head)
POOLS = ("mean", "flatten")


@dataclass(frozen=True)
class ViTConfig:
    """Every setting of the network (``model.net``); the annotations are the checks."""

    image_size: PositiveInt = 32
    channels: PositiveInt = 3
    patch_size: PositiveInt = 8  # image_size must be a multiple (config/settings.py checks it)
    num_classes: PositiveInt = 10
    width: PositiveInt = 128
    num_heads: PositiveInt = 4
    num_blocks: PositiveInt = 3
    softmax_scale: Positive = 1.0
    final_scale: Positive = 1.0
    residual_scale: Positive = 1.0
    blocks_mass: Positive = 16.0
    target_norms: Literal[TARGET_NORMS] = "modula"
    zero_init: bool = True
    gelu: Literal[GELUS] = "tanh"
    attention: Literal[VIT_ATTENTION] = "sdpa"
    pool: Literal[POOLS] = "mean"
    # subtracted from every pixel: 0.5 centres them, so a patch's RMS is at most 0.5 and the domain
    # the certificate holds on is the smallest (a network without biases cannot shift them itself)
    input_shift: Annotated[float, at.Interval(ge=0, le=1)] = 0.5

    def blocks(self, num_patches: int) -> GPTConfig:
        """The GPT's settings its blocks read."""
        return GPTConfig(width=self.width, num_heads=self.num_heads, num_blocks=self.num_blocks, seq_len=num_patches,
                         softmax_scale=self.softmax_scale, residual_scale=self.residual_scale, gelu=self.gelu,
                         attention=self.attention)


class ViT(nn.Module):
    config_schema = ViTConfig

    def __init__(self, **config):
        super().__init__()
        cfg = ViTConfig(**config)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"model.net.patch_size={cfg.patch_size} must divide model.net.image_size={cfg.image_size}")
        self.config = cfg
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_dim = cfg.channels * cfg.patch_size**2
        self.patch = nn.Linear(self.patch_dim, cfg.width, bias=False)
        self.blocks = nn.ModuleList(Block(cfg.blocks(self.num_patches)) for _ in range(cfg.num_blocks))
        self.head = nn.Linear(cfg.width * (self.num_patches if cfg.pool == "flatten" else 1), cfg.num_classes, bias=False)
        cos, sin = rotary_tables(self.num_patches, cfg.width // cfg.num_heads, 10000.0)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for matrix in self.named_matrices().values():
            orthogonal_(matrix)
        if self.config.zero_init:  # as the GPT: attention output, MLP down and head start at zero
            for block in self.blocks:
                block.attention.out.weight.zero_()
                block.mlp.down.weight.zero_()
            self.head.weight.zero_()

    def patches(self, images: Tensor) -> Tensor:
        """``(batch, 32, 32, 3)`` (or its 3072 values flattened) -> ``(batch, N, 3 p^2)``, shifted."""
        cfg, p = self.config, self.config.patch_size
        x = images.reshape(-1, cfg.image_size, cfg.image_size, cfg.channels)
        x = x.unfold(1, p, p).unfold(2, p, p)  # (batch, rows, columns, channels, p, p)
        x = x.flatten(3).flatten(1, 2)
        return x - cfg.input_shift if cfg.input_shift else x

    def features(self, images: Tensor) -> Tensor:
        """The last block's tokens ``(batch, N, width)``."""
        x = self.patch(self.patches(images))
        rotary, mask = (self.rotary_cos, self.rotary_sin), AttentionMask(causal=False)
        for l, block in enumerate(self.blocks):
            x = block(x, rotary, mask, None, str(l))
        return x

    def pooled(self, features: Tensor) -> Tensor:
        return features.mean(dim=1) if self.config.pool == "mean" else features.flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.pooled(self.features(images))) * self.config.final_scale

    # ------------------------------------------------------------------ what the framework needs

    def named_matrices(self) -> dict[str, nn.Parameter]:
        """Every matrix under the bound's names: the GPT's per block, ``patch`` and ``out``."""
        matrices = {"patch": self.patch.weight}
        for l, block in enumerate(self.blocks):
            matrices.update({
                f"q{l}": block.attention.q.weight, f"k{l}": block.attention.k.weight, f"v{l}": block.attention.v.weight,
                f"w{l}": block.attention.out.weight, f"mlp_in{l}": block.mlp.up.weight, f"mlp_out{l}": block.mlp.down.weight,
            })
        matrices["out"] = self.head.weight
        return matrices

    def param_specs(self) -> list[ParamSpec]:
        targets = gpt_target_norms(self.config.blocks_mass)
        if self.config.target_norms == "unit":
            targets = dict.fromkeys(targets, 1.0)
        role_of = {"q": "qkv", "k": "qkv", "v": "qkv", "w": "attention_out", "mlp_in": "mlp_up", "mlp_out": "mlp_down"}
        specs = []
        for name, weight in self.named_matrices().items():
            if name == "out":
                specs.append(ParamSpec(name, weight, Role.HEAD, targets["head"]))
            elif name == "patch":  # the GPT's embedding share, as a matrix (RMS->RMS), not a table of rows
                specs.append(ParamSpec(name, weight, Role.HIDDEN, targets["embedding"]))
            else:
                specs.append(ParamSpec(name, weight, Role.HIDDEN, targets[role_of[name.rstrip("0123456789")]]))
        return specs

    def layer_norms(self) -> dict[str, float]:
        """RMS->RMS norm of every matrix, in the bound's names."""
        return {name: rms_norm(weight) for name, weight in self.named_matrices().items()}

    def domain_radius(self, patch_norm: float | Tensor, radius: float) -> float | Tensor:
        """The largest token RMS the patch embedding gives any image in ``[0, 1]^3072`` moved by at most
        ``radius`` in l2: ``||P|| (max(shift, 1 - shift) + radius / sqrt(3 p^2))`` (docs/certificate.md §8)."""
        shift = self.config.input_shift
        return patch_norm * (max(shift, 1 - shift) + radius / math.sqrt(self.patch_dim))

    def blocks_certificate(self, norms: dict | None = None, *, radius: float = 0.0) -> GPTCertificate:
        """The GPT's certificate of the blocks (``bound``: their Lipschitz constant in largest-token-RMS
        units, no head) on the domain of ``domain_radius(radius)``, with its per-block activation and
        attention-logit bounds. Norms may be 0-d tensors (the margin loss's)."""
        norms = norms if norms is not None else self.layer_norms()
        cfg = self.config
        return gpt_certificate(
            {**norms, "out": 1.0}, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads, softmax_scale=cfg.softmax_scale,
            residual_scale=cfg.residual_scale, gelu=cfg.gelu, input_radius=self.domain_radius(norms["patch"], radius),
        )

    def pooled_l2_gain(self, norms: dict, radius: float = 0.0) -> float | Tensor:
        """``||pooled(a) - pooled(b)||_2 <= gain ||a - b||_2`` for images ``a, b`` within ``radius`` of
        ``[0, 1]^3072``: a patch moves by at most ``||a - b||``, so every token by ``||P||_rms / sqrt(3 p^2)``
        times that in RMS; the blocks multiply the largest token's by their bound; the mean over tokens
        moves by at most the largest, all of them side by side by ``sqrt(N)`` times it; back to l2."""
        tokens = self.num_patches if self.config.pool == "flatten" else 1
        return self.blocks_certificate(norms, radius=radius).bound * norms["patch"] * math.sqrt(self.config.width * tokens / self.patch_dim)

    def _norms_on_device(self) -> dict[str, Tensor]:
        return {name: rms_norm_on_device(weight) for name, weight in self.named_matrices().items()}

    def certified_bound(self, norms: dict | None = None, radius: float = 0.0) -> float:
        """The logits' Lipschitz bound in RMS units (pixels -> logits) over images in ``[0, 1]^3072``
        moved by at most ``radius``."""
        norms = norms if norms is not None else self.layer_norms()
        return float(self._logit_l2(norms, radius) * math.sqrt(self.patch_dim * self.num_patches / self.config.num_classes))

    def logit_l2_bound(self, radius: float = 0.0) -> Tensor:
        """``||f(a) - f(b)||_2 <= L ||a - b||_2`` for images within ``radius`` of ``[0, 1]^3072``: a 0-d
        tensor on the weights' device, computed without waiting for it (the margin loss asks every step)."""
        return self._logit_l2(self._norms_on_device(), radius)

    def _logit_l2(self, norms: dict, radius: float) -> float | Tensor:
        """``|c| sigma_max(W_out)`` (its RMS->RMS norm back in l2) times ``pooled_l2_gain``."""
        sigma_head = norms["out"] * math.sqrt(self.config.num_classes / self.head.in_features)
        return self.config.final_scale * sigma_head * self.pooled_l2_gain(norms, radius)

    def pairwise_l2_bound(self, radius: float = 0.0) -> Tensor:
        """``K[y, j]``: ``f_y - f_j`` moves by at most ``K[y, j] ||a - b||_2`` between images within ``radius``
        of ``[0, 1]^3072``: ``|c| ||W_y - W_j||_2`` times ``pooled_l2_gain``. Float64, on the weights' device."""
        return self.config.final_scale * head_row_distances(self.head.weight) * self.pooled_l2_gain(self._norms_on_device(), radius)

    def local_pairwise_drop(self, images: Tensor, radius: float) -> tuple[Tensor, Tensor]:
        """The logits of ``images`` and, per image, how far each ``f_y - f_j`` can fall within l2 ``radius``
        of it: ``(batch, classes)`` logits and ``(batch, classes, classes)`` drops, from the activations
        each image really reaches (``robustness.local``: docs/certificate.md §9). Float64 throughout.
        ``robustness.certified.LocalCertificate`` takes the smaller of these and the global ones."""
        from lipschitz_lightning.robustness.local import vit_reach

        reach = vit_reach(self, images, radius)
        drops = self.config.final_scale * head_row_distances(self.head.weight)[None] * reach.pooled[:, None, None]
        return reach.logits, drops

    def config_dict(self) -> dict:
        return asdict(self.config)
