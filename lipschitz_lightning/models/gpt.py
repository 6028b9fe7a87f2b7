"""The Modula-parametrised GPT of the paper (SPEC §8): every weight constrained, no biases, no
layer norm, no QK norm, no logit soft-capping. Read top to bottom:

    tokens -> embedding (token vectors of RMS 1)
           -> L blocks, each   x <- (1-a) x + a Attn(x);   x <- (1-a) x + a MLP(x),   a = r / (2L)
           -> head (d -> vocab) * final_scale

Attention: q, k, v (d -> d) split into heads, RoPE on q and k, scores ``q k^T * softmax_scale / d_head``
(1/d_head, not 1/sqrt(d_head)), causal softmax, output ``(1/3) * scores v``, merged, projected (d -> d).
MLP: d -> 4d, ``gelu_tanh(x) / 1.1289`` (GeLU's largest slope, so the nonlinearity is 1-Lipschitz),
4d -> d. With ``zero_init`` the attention output, MLP down and head matrices start at zero, so the
initial logits are exactly 0.

The scaling factors (1/3, 1/d_head, 1/1.1289, the convex residual mix) are what make every piece's
Lipschitz constant computable from the weights' RMS->RMS norms; ``certified_bound`` does that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz_lightning.lipschitz import GELU_MAX_SLOPE, embedding_norm, gpt_bound, rms_norm
from lipschitz_lightning.optim.roles import ParamSpec, Role, gpt_target_norms

LAYERNORM_SUBSTITUTES = ("none", "rmsnorm", "layernorm", "tanh")
ATTENTION_OUTPUT_SCALE = 1 / 3  # Modula's functional attention: (1/3) softmax(...) v


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    width: int = 256
    num_heads: int = 4
    num_blocks: int = 3
    seq_len: int = 256
    softmax_scale: float = 1.0
    final_scale: float = 1.0
    residual_scale: float = 1.0
    blocks_mass: float = 16.0
    layernorm_substitute: str = "none"
    zero_init: bool = True
    rope_base: float = 10000.0
    attention: str = "sdpa"


# ---------------------------------------------------------------------------- attention kernels
# (q, k, v) of shape (batch, heads, seq, head_dim) and the score scale -> (batch, heads, seq, head_dim).
# The bound does not depend on how the softmax is computed; a GPU recipe swaps in flex attention here.


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, stats: dict | None = None, name: str = "") -> Tensor:
    """The same causal softmax written out; it also exposes the pre-softmax logits to ``stats``."""
    seq = q.shape[-2]
    logits = (q @ k.transpose(-2, -1)) * scale
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    if stats is not None:
        stats[f"attention/max_logit_{name}"] = logits.masked_select(causal).max().detach()
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1) @ v


ATTENTION_KERNELS: dict[str, Callable[..., Tensor]] = {"sdpa": sdpa_attention, "explicit": explicit_attention}


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (first half, second half) pair of a head's coordinates by its position's angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def layernorm_substitute(name: str) -> Callable[[Tensor], Tensor]:
    # parameter-free: every weight of the network stays a constrained matrix
    return {
        "none": lambda x: x,
        "rmsnorm": lambda x: F.rms_norm(x, (x.shape[-1],)),
        "layernorm": lambda x: F.layer_norm(x, (x.shape[-1],)),
        "tanh": torch.tanh,
    }[name]


def orthogonal_(weight: Tensor) -> Tensor:
    """orth(normal) * scale: every singular value sqrt(fanout / fanin), i.e. RMS->RMS norm 1."""
    nn.init.orthogonal_(weight)
    return weight.mul_(math.sqrt(weight.shape[0] / weight.shape[1]))


# ---------------------------------------------------------------------------- the network


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        self.q = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k = nn.Linear(cfg.width, cfg.width, bias=False)
        self.v = nn.Linear(cfg.width, cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)
        self.scale = cfg.softmax_scale / self.head_dim
        self.kernel = ATTENTION_KERNELS[cfg.attention]

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], stats: dict | None, name: str) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if stats is None:
            y = self.kernel(q, k, v, self.scale)
        else:
            y = explicit_attention(q, k, v, self.scale, stats, name)
        y = y.transpose(1, 2).reshape(batch, seq, width) * ATTENTION_OUTPUT_SCALE
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.down = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh") / GELU_MAX_SLOPE)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention, self.mlp = Attention(cfg), MLP(cfg)
        self.norm = layernorm_substitute(cfg.layernorm_substitute)
        self.mix = cfg.residual_scale / (2 * cfg.num_blocks)

    def forward(self, x: Tensor, rotary, stats: dict | None, name: str) -> Tensor:
        a = self.mix
        x = (1 - a) * x + a * self.attention(self.norm(x), rotary, stats, name)
        x = (1 - a) * x + a * self.mlp(self.norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, **config):
        super().__init__()
        cfg = GPTConfig(**config)
        if cfg.width % cfg.num_heads:
            raise ValueError(f"model.net.num_heads={cfg.num_heads} must divide model.net.width={cfg.width}")
        if (cfg.width // cfg.num_heads) % 2:
            raise ValueError(f"model.net.width / model.net.num_heads = {cfg.width // cfg.num_heads} must be even for RoPE")
        if cfg.layernorm_substitute not in LAYERNORM_SUBSTITUTES:
            raise ValueError(f"model.net.layernorm_substitute must be one of {list(LAYERNORM_SUBSTITUTES)}, got {cfg.layernorm_substitute!r}")
        if cfg.attention not in ATTENTION_KERNELS:
            raise ValueError(f"model.net.attention must be one of {list(ATTENTION_KERNELS)}, got {cfg.attention!r}")
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.width // cfg.num_heads, cfg.rope_base)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        E = self.embedding.weight.normal_()
        E.div_(E.pow(2).mean(dim=-1, keepdim=True).sqrt())  # every token vector at RMS exactly 1
        for name, param in self.named_parameters():
            if param.ndim == 2 and not name.startswith("embedding"):
                orthogonal_(param)
        if self.config.zero_init:
            for block in self.blocks:
                block.attention.out.weight.zero_()
                block.mlp.down.weight.zero_()
            self.head.weight.zero_()

    def forward(self, tokens: Tensor, stats: dict | None = None) -> Tensor:
        """Logits ``(batch, seq, vocab)``. With a ``stats`` dict, also record the activations the
        paper watches: each block's largest token RMS and largest entry, each layer's largest
        pre-softmax attention logit (this path writes the softmax out, so keep it for evaluation)."""
        return self.forward_embedded(self.embedding(tokens), stats)

    def forward_embedded(self, x: Tensor, stats: dict | None = None) -> Tensor:
        """The network after the embedding: what the certified bound speaks about, per embedding norm."""
        if x.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens is longer than model.net.seq_len={self.config.seq_len}")
        rotary = (self.rotary_cos, self.rotary_sin)
        for l, block in enumerate(self.blocks):
            x = block(x, rotary, stats, str(l))
            if stats is not None:
                stats[f"activation/rms_max_block{l}"] = x.pow(2).mean(dim=-1).sqrt().max().detach()
                stats[f"activation/abs_max_block{l}"] = x.abs().max().detach()
        return self.head(x) * self.config.final_scale

    # ------------------------------------------------------------------ what the framework needs

    def named_matrices(self) -> dict[str, nn.Parameter]:
        """Every matrix under the bound's names (SPEC §7, fixtures' ``transformer_bound``)."""
        matrices = {}
        for l, block in enumerate(self.blocks):
            matrices.update({
                f"q{l}": block.attention.q.weight,
                f"k{l}": block.attention.k.weight,
                f"v{l}": block.attention.v.weight,
                f"w{l}": block.attention.out.weight,
                f"mlp_in{l}": block.mlp.up.weight,
                f"mlp_out{l}": block.mlp.down.weight,
            })
        matrices["out"] = self.head.weight
        return matrices

    def param_specs(self) -> list[ParamSpec]:
        targets = gpt_target_norms(self.config.blocks_mass)
        role_of = {"q": "qkv", "k": "qkv", "v": "qkv", "w": "attention_out", "mlp_in": "mlp_up", "mlp_out": "mlp_down"}
        specs = [ParamSpec("embed", self.embedding.weight, Role.EMBEDDING, targets["embedding"])]
        for name, weight in self.named_matrices().items():
            if name == "out":
                specs.append(ParamSpec(name, weight, Role.HEAD, targets["head"]))
            else:
                specs.append(ParamSpec(name, weight, Role.HIDDEN, targets[role_of[name.rstrip("0123456789")]]))
        return specs

    def layer_norms(self) -> dict[str, float]:
        """RMS->RMS norm of every matrix and the embedding's largest token RMS, in the bound's names."""
        return {"embed": embedding_norm(self.embedding.weight), **{n: rms_norm(w) for n, w in self.named_matrices().items()}}

    def certified_bound(self, norms: dict[str, float] | None = None) -> float:
        """Lipschitz bound of the logits (per-token RMS, max over positions) in the one-hot tokens.

        Normalisation layers are not Lipschitz near 0, so with ``rmsnorm`` / ``layernorm`` there is
        no certificate (inf). ``tanh`` is 1-Lipschitz and keeps activations' RMS below 1, so the
        bound stands.
        """
        if self.config.layernorm_substitute in ("rmsnorm", "layernorm"):
            return math.inf
        norms = norms if norms is not None else self.layer_norms()
        bound = gpt_bound(norms, self.config.num_blocks, self.config.softmax_scale, self.config.residual_scale)
        return bound * self.config.final_scale

    def config_dict(self) -> dict:
        return asdict(self.config)
