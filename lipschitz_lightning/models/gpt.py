"""The Modula-parametrised GPT of the paper (SPEC §8): every weight constrained, no biases, no
layer norm, no QK norm, no logit soft-capping. One class, sized by config: the 2M-parameter
Shakespeare transformer and the 145M NanoGPT are two configs of it. Read top to bottom:

    tokens -> embedding (token vectors of RMS 1)
           -> L blocks, each   x <- (1-a) x + a Attn(x);   x <- (1-a) x + a MLP(x),   a = r / (2L)
           -> head (d -> vocab) * final_scale

Attention: q, k, v (d -> d) split into heads, RoPE on q and k, scores ``q k^T * softmax_scale / d_head``
(1/d_head, not 1/sqrt(d_head)), causal softmax, output ``(1/3) * scores v``, merged, projected (d -> d).
MLP: d -> 4d, ``gelu(x) / 1.1289`` (GeLU's largest slope, so the nonlinearity is ~1-Lipschitz),
4d -> d. With ``zero_init`` the attention output, MLP down and head matrices start at zero, so the
initial logits are exactly 0.

The NanoGPT recipe adds, all as config: a causal mask restricted to the token's document (a
``document_token`` starts one) and to a sliding window that grows over training (per block long
or short, ``window_pattern``), RoPE on half the frequencies, exact GeLU, and an embedding
lookup that caps each token vector's RMS (``embed_max_rms``). Masks only remove keys, so the
certificate holds for all of them.

The scaling factors (1/3, 1/d_head, 1/1.1289, the convex residual mix) are what make every piece's
Lipschitz constant computable from the weights' RMS->RMS norms; ``certificate`` does that
(docs/certificate.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import (
    GELU_DIVISOR,
    GPTCertificate,
    at_most,
    embedding_norm,
    embedding_norm_on_device,
    gpt_bound_paper_formula,
    gpt_certificate,
    rms_norm,
    rms_norm_on_device,
)
from lipschitz_lightning.core.losses import CrossEntropy, LossCounts, linear_cross_entropy
from lipschitz_lightning.core.roles import ParamSpec, Role, gpt_target_norms
from lipschitz_lightning.core.types import NonNegativeInt, Positive, PositiveInt
from lipschitz_lightning.errors import ConfigError

LAYERNORM_SUBSTITUTES = ("none", "rmsnorm", "layernorm", "tanh")
GELUS = ("tanh", "exact")
ROPES = ("standard", "half_truncated")
TARGET_NORMS = ("modula", "unit")
ATTENTION_OUTPUT_SCALE = 1 / 3  # Modula's functional attention: (1/3) softmax(...) v
BLOCK = 128  # flex attention's block of tokens; sliding windows count whole blocks
DENSE_BAND = 1024  # queries per band of a dense mask (SDPA's path)


@dataclass(frozen=True)
class GPTConfig:
    """Every setting of the network (``model.net`` in the configs); the annotations are the checks."""

    vocab_size: PositiveInt = 65
    width: PositiveInt = 256
    num_heads: PositiveInt = 4
    num_blocks: PositiveInt = 3
    seq_len: PositiveInt = 256  # the longest sequence (training or validation) the model accepts
    softmax_scale: Positive = 1.0
    final_scale: Positive = 1.0
    residual_scale: Positive = 1.0
    blocks_mass: Positive = 16.0
    # modula: SPEC §5's per-role target norms; unit: every weight 1 (NanoGPT, where per-role
    # learning rates take their place)
    target_norms: Literal[TARGET_NORMS] = "modula"
    layernorm_substitute: Literal[LAYERNORM_SUBSTITUTES] = "none"
    zero_init: bool = True
    gelu: Literal[GELUS] = "tanh"
    rope: Literal[ROPES] = "standard"
    rope_base: Positive = 10000.0
    attention: Literal[tuple(ATTENTION_KERNELS)] = "sdpa"
    # token that starts a document (GPT-2's <|endoftext|> is 50256); null: no document mask
    document_token: NonNegativeInt | None = None
    # one letter per block, L (long) or S (short: half the window); null: no sliding window
    window_pattern: str | None = None
    # the window's first and last size in tokens, whole blocks of 128 (see window_blocks)
    window_min: PositiveInt = 128
    window_max: PositiveInt = 1792
    # token vectors are looked up with RMS at most this (nn.Embedding's max_norm); null: as stored
    embed_max_rms: Positive | None = None
    # Kimi's QK-clip (MuonClip), a baseline against the constraints: after every step, each head
    # whose largest |logit| in that step passed this has its q and k rows scaled by
    # sqrt(logit_clip / largest); null: off (the paper's model)
    logit_clip: Positive | None = None


# ---------------------------------------------------------------------------- masks
# Which keys a query may attend to: causal, within the query's document, and within the last
# ``window_blocks`` blocks of BLOCK tokens (its own block included). One predicate (``allows``)
# builds the dense mask (SDPA, the explicit path) and is flex attention's ``mask_mod``; the block
# tables flex skips work with are an exact summary of it. The window counts whole blocks, as the
# paper's script and modded-nanogpt do (a query late in its block sees up to BLOCK - 1 more keys
# than one early in it), and it is a tensor: a new window changes data, not code, so nothing
# compiled is specialised on it.


@dataclass(frozen=True)
class AttentionMask:
    documents: Tensor | None = None  # (batch, seq) document index of every token
    window_blocks: Tensor | None = None  # 0-d integer tensor, at least 1; None: no window
    causal: bool = True  # False: every token sees every key of its document and window (the ViT's patches)
    _built: dict = field(default_factory=dict, compare=False, repr=False)  # per forward, not per block

    def __post_init__(self):
        if not self.causal and not self.is_plain:
            # the bands below stop at the query's own position: a bidirectional mask would need the keys after it
            raise ValueError("a bidirectional AttentionMask takes no documents or window")

    @property
    def is_plain(self) -> bool:
        """No mask but causality (or none): SDPA's own flag says it all."""
        return self.documents is None and self.window_blocks is None

    def halved(self) -> AttentionMask:
        """The short window of the blocks marked S: half as many blocks, at least one (the paper's
        ``window // 2`` is 0 blocks at the start, which its block tables treat as 1)."""
        if self.window_blocks is None:
            return self
        return AttentionMask(self.documents, torch.clamp(self.window_blocks // 2, min=1), self.causal)

    def allows(self, batch: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = q_idx >= kv_idx if self.causal else torch.ones_like(q_idx >= kv_idx)
        if self.window_blocks is not None:
            allowed = allowed & (q_idx // BLOCK - kv_idx // BLOCK < self.window_blocks)
        if self.documents is not None:
            allowed = allowed & (self.documents[batch, q_idx] == self.documents[batch, kv_idx])
        return allowed

    def dense(self, batch: int, seq: int, device: torch.device) -> Tensor:
        """``(batch or 1, 1, seq, seq)`` booleans, True where attention is allowed."""
        key = ("dense", batch, seq, device)
        if key not in self._built:
            b = torch.arange(batch if self.documents is not None else 1, device=device)[:, None, None]
            positions = torch.arange(seq, device=device)
            dense = torch.empty(len(b), 1, seq, seq, dtype=torch.bool, device=device)
            # a band of queries at a time: the predicate's integer temporaries for all seq^2 pairs
            # at once would be 8x the mask itself (2 GiB at 16k tokens)
            for start in range(0, seq, DENSE_BAND):
                queries = positions[None, start : start + DENSE_BAND, None]
                dense[:, 0, start : start + DENSE_BAND] = self.allows(b, queries, positions[None, None, :])
            self._built[key] = dense
        return self._built[key]

    def band(self, batch: int, start: int, stop: int, device: torch.device) -> tuple[int, Tensor]:
        """The queries ``start:stop`` against every key that any of them may see: the first such
        key and the ``(batch or 1, 1, stop - start, stop - first)`` mask. Without a window, on CUDA
        (reading the window's size would wait for the device) or compiled, the keys start at 0."""
        key = ("band", batch, start, stop, device)
        if key not in self._built:
            first = 0
            # (compiled, reading the size would split the graph and specialise it on every window)
            if self.window_blocks is not None and device.type != "cuda" and not torch.compiler.is_compiling():
                first = max(0, (start // BLOCK - int(self.window_blocks) + 1) * BLOCK)
            b = torch.arange(batch if self.documents is not None else 1, device=device)[:, None, None]
            queries = torch.arange(start, stop, device=device)[None, :, None]
            keys = torch.arange(first, stop, device=device)[None, None, :]
            self._built[key] = first, self.allows(b, queries, keys)[:, None]
        return self._built[key]

    def block_mask(self, batch: int, seq: int, device: torch.device):
        """Flex attention's ``BlockMask``, built from block indices (modded-nanogpt's way; no pass
        over all seq^2 pairs): for every pair of blocks, whether every pair of their tokens is
        allowed (a full block, no mask evaluated) or only some (a partial block, ``allows`` decides)."""
        from torch.nn.attention.flex_attention import BlockMask

        key = ("block", batch, seq, device)
        if key in self._built:
            return self._built[key]
        if seq % BLOCK:
            raise ValueError(f"flex attention runs on sequences of a multiple of {BLOCK} tokens, got {seq} (data.seq_len, data.val_seq_len)")
        blocks = torch.arange(seq // BLOCK, device=device)
        q, kv = blocks[:, None], blocks[None, :]
        some, every = ((q >= kv)[None], (q > kv)[None]) if self.causal else ((q >= 0) & (kv >= 0),) * 2
        if self.window_blocks is not None:
            inside = (q - kv < self.window_blocks)[None]
            some, every = some & inside, every & inside
        if self.documents is not None:
            # document indices never decrease along a sequence, so a block spans [first, last]
            first, last = self.documents[:, ::BLOCK], self.documents[:, BLOCK - 1 :: BLOCK]
            some = some & (first[:, :, None] <= last[:, None, :]) & (last[:, :, None] >= first[:, None, :])
            every = every & (first[:, :, None] == last[:, None, :]) & (last[:, :, None] == first[:, None, :])

        def as_kv_blocks(allowed: Tensor) -> tuple[Tensor, Tensor]:
            counts = allowed.sum(dim=-1, dtype=torch.int32)
            indices = allowed.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
            return counts[:, None].contiguous(), indices[:, None].contiguous()

        self._built[key] = BlockMask.from_kv_blocks(
            *as_kv_blocks(some & ~every), *as_kv_blocks(every), BLOCK_SIZE=BLOCK,
            mask_mod=lambda b, h, q_idx, kv_idx: self.allows(b, q_idx, kv_idx),
        )
        return self._built[key]


# ---------------------------------------------------------------------------- attention kernels
# (q, k, v) of shape (batch, heads, seq, head_dim), the score scale and the mask -> (batch, heads,
# seq, head_dim). The bound does not depend on how the softmax is computed.


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: AttentionMask) -> Tensor:
    """SDPA over bands of ``DENSE_BAND`` queries, each against the keys it may see: the mask (which
    SDPA turns into floats) never spans all seq^2 pairs, and a window skips the keys behind it."""
    if mask.is_plain:
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale)
    batch, seq = q.shape[0] if mask.documents is not None else 1, q.shape[-2]
    outputs = []
    for start in range(0, seq, DENSE_BAND):
        stop = min(start + DENSE_BAND, seq)
        first, allowed = mask.band(batch, start, stop, q.device)
        outputs.append(F.scaled_dot_product_attention(
            q[..., start:stop, :], k[..., first:stop, :], v[..., first:stop, :], attn_mask=allowed, scale=scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: AttentionMask) -> Tensor:
    """The same masked softmax written out."""
    logits = (q @ k.transpose(-2, -1)) * scale
    allowed = mask.dense(q.shape[0], q.shape[-2], q.device)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


# The attention logits a forward pass records beside its output are the ones of all its
# sequences where they fit in this many entries (Shakespeare's batch of 64 x 4 heads x 256^2: 16.8M);
# else of the first sequence's first STATS_QUERIES queries, exact for them since attention is causal.
STATS_ENTRIES = 1 << 25
STATS_QUERIES = 4096


@torch.no_grad()
def record_logits(q: Tensor, k: Tensor, scale: float, mask: AttentionMask, stats: dict, name: str) -> None:
    """The largest pre-softmax logit, the largest |logit| and the largest |logit| of each head, over
    the keys the mask allows: the product ``q k^T`` written out beside the kernel's output (no
    gradient), left on the device until someone reads it."""
    batch, heads, seq, _ = q.shape
    if batch * heads * seq * seq > STATS_ENTRIES:
        q, k, batch, seq = q[:1, :, :STATS_QUERIES], k[:1, :, :STATS_QUERIES], 1, min(seq, STATS_QUERIES)
        mask = AttentionMask(None if mask.documents is None else mask.documents[:1, :seq], mask.window_blocks, mask.causal)
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    allowed = mask.dense(batch if mask.documents is not None else 1, seq, q.device)
    largest = logits.abs().masked_fill(~allowed, 0).amax(dim=(0, 2, 3))  # per head
    record_max(stats, f"attention/max_logit_{name}", logits.masked_fill(~allowed, float("-inf")).amax())
    record_max(stats, f"attention/max_abs_logit_{name}", largest.amax())  # what the certificate bounds (attention_logit)
    record_max(stats, f"attention/max_abs_logit_per_head_{name}", largest)


def record_max(stats: dict, key: str, value: Tensor) -> None:
    """``stats[key]``, or the larger of it and ``value`` (micro-batches of one step add to one record)."""
    stats[key] = value if key not in stats else torch.maximum(stats[key], value)


@functools.cache
def compiled_flex_attention():
    """Flex attention compiled once per process (uncompiled, it materialises the full score
    matrix). With the mask's tensors as inputs, a process compiles one graph per sequence length
    and grad mode: training and validation lengths give two, whatever the window."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: AttentionMask) -> Tensor:
    if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError(
            f"model.net.attention=flex trains on CUDA only: torch {torch.__version__}'s flex attention has no backward on "
            f"{q.device.type} (it runs forward-only there); use model.net.attention=auto (flex on CUDA, SDPA elsewhere)"
        )
    block_mask = mask.block_mask(q.shape[0] if mask.documents is not None else 1, q.shape[-2], q.device)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)


def auto_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: AttentionMask) -> Tensor:
    """Flex attention on CUDA (fused, sparse in the mask), SDPA with the dense mask elsewhere."""
    return (flex_attention if q.is_cuda else sdpa_attention)(q, k, v, scale, mask)


ATTENTION_KERNELS: dict[str, Callable[..., Tensor]] = {
    "sdpa": sdpa_attention,
    "explicit": explicit_attention,
    "flex": flex_attention,
    "auto": auto_attention,
}


# ---------------------------------------------------------------------------- RoPE


def rotary_tables(seq_len: int, head_dim: int, base: float, kind: str = "standard") -> tuple[Tensor, Tensor]:
    """cos and sin of each position's angle for each (first half, second half) coordinate pair.

    ``standard``: frequencies ``base^(-2i / head_dim)``. ``half_truncated`` (modded-nanogpt): a
    quarter of the head's size spread from 1 to ``1 / base``, the other quarter at frequency 0,
    so half the coordinates carry no position.
    """
    if kind == "standard":
        frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    else:
        spread = (1 / base) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        frequencies = torch.cat([spread, spread.new_zeros(head_dim // 2 - head_dim // 4)])
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

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: AttentionMask, stats: dict | None, name: str) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self.kernel(q, k, v, self.scale, mask)
        if stats is not None:
            record_logits(q, k, self.scale, mask, stats, name)
        y = y.transpose(1, 2).reshape(batch, seq, width) * ATTENTION_OUTPUT_SCALE
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.down = nn.Linear(4 * cfg.width, cfg.width, bias=False)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate) / GELU_DIVISOR)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention, self.mlp = Attention(cfg), MLP(cfg)
        self.norm = layernorm_substitute(cfg.layernorm_substitute)
        self.mix = cfg.residual_scale / (2 * cfg.num_blocks)

    def forward(self, x: Tensor, rotary, mask: AttentionMask, stats: dict | None, name: str) -> Tensor:
        a = self.mix
        x = (1 - a) * x + a * self.attention(self.norm(x), rotary, mask, stats, name)
        x = (1 - a) * x + a * self.mlp(self.norm(x))
        return x


class GPT(nn.Module):
    config_schema = GPTConfig  # the settings of model.net: commands.settings checks them before anything is built

    def __init__(self, **config):
        super().__init__()
        cfg = GPTConfig(**config)
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.width // cfg.num_heads, cfg.rope_base, cfg.rope)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self._window_tensors: dict[tuple, Tensor] = {}  # see window()
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

    def window_blocks(self, progress: float) -> int | None:
        """The sliding window, in blocks of 128 tokens, at a fraction ``progress`` of training: the
        paper's (modded-nanogpt's) schedule ``ceil((window_max - 64) * progress / 128)`` blocks, at
        least ``window_min``. For 128..1792 that is ``ceil(1728 progress / 128)``: 1 block at the
        start, 14 windows in all, the last (14 blocks) only in the final 3.7% of training."""
        if self.config.window_pattern is None:
            return None
        cfg = self.config
        grown = math.ceil((cfg.window_max - BLOCK // 2) * min(max(progress, 0.0), 1.0) / BLOCK)
        return min(cfg.window_max // BLOCK, max(cfg.window_min // BLOCK, grown))

    def window(self, progress: float, device: torch.device) -> Tensor | None:
        """``window_blocks(progress)`` as a device tensor made once per size, for training: a Python
        int would specialise compiled code on it, a fresh tensor copy per step would wait for the
        device. None: plain causal attention."""
        blocks = self.window_blocks(progress)
        if blocks is None:
            return None
        if (blocks, device) not in self._window_tensors:
            self._window_tensors[(blocks, device)] = torch.tensor(blocks, dtype=torch.int32, device=device)
        return self._window_tensors[(blocks, device)]

    def next_token_loss(self, features: Tensor, targets: Tensor, chunk: int = 4096, loss: CrossEntropy | None = None,
                        margin: Tensor | None = None) -> LossCounts:
        """The mean cross-entropy of the head's logits at every position (``loss``'s, with its
        temperature and ``margin``), how many argmaxes were right and how many positions' margins
        exceed ``margin``, the vocabulary taken ``chunk`` positions at a time
        (``core.losses.linear_cross_entropy``: no step holds every position's logits)."""
        return linear_cross_entropy(features.flatten(0, -2), self.head.weight, targets.flatten(), self.config.final_scale,
                                    chunk, loss, margin)

    def embed(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        if self.config.embed_max_rms is not None:
            # nn.Embedding(max_norm=...) would rescale the stored rows in place, differently on each
            # DDP rank (each sees other tokens); scaling the looked-up copy gives the same forward
            # pass and gradient, and leaves the weights alone
            rms = x.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()
            x = x * (self.config.embed_max_rms / rms.clamp(min=self.config.embed_max_rms)).to(x.dtype)
        return x

    def forward(self, tokens: Tensor, stats: dict | None = None, window: Tensor | int | None = None) -> Tensor:
        """Logits ``(batch, seq, vocab)``. With a ``stats`` dict, also record the activations the
        paper watches: each block's largest token RMS and largest entry, each layer's largest
        pre-softmax attention logit (this path writes the softmax out, so keep it short).
        ``window``: the sliding window in blocks (``window_blocks``), ignored without a window pattern."""
        return self.logits(self.features(tokens, stats, window))

    def features(self, tokens: Tensor, stats: dict | None = None, window: Tensor | int | None = None) -> Tensor:
        """The last block's output ``(batch, seq, width)``: the logits are ``logits(features)``.
        Training and validation stop here and take the loss over the vocabulary in chunks of
        tokens (``losses.linear_cross_entropy``), never forming every position's logits at once."""
        documents = None
        if self.config.document_token is not None:
            documents = (tokens == self.config.document_token).cumsum(dim=-1)
        if window is not None and self.config.window_pattern is not None:
            window = torch.as_tensor(window, device=tokens.device)
        else:
            window = None
        return self.features_embedded(self.embed(tokens), stats, AttentionMask(documents, window))

    def logits(self, features: Tensor) -> Tensor:
        return self.head(features) * self.config.final_scale

    def forward_embedded(self, x: Tensor, stats: dict | None = None, mask: AttentionMask | None = None) -> Tensor:
        """The network after the embedding: what the certified bound speaks about."""
        return self.logits(self.features_embedded(x, stats, mask))

    def features_embedded(self, x: Tensor, stats: dict | None = None, mask: AttentionMask | None = None) -> Tensor:
        if x.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens is longer than model.net.seq_len={self.config.seq_len}")
        mask = mask or AttentionMask()
        rotary = (self.rotary_cos, self.rotary_sin)
        pattern = self.config.window_pattern
        # the two masks every block shares: built (lazily, by the first block that needs each) once per forward
        masks = {"L": mask, "S": mask.halved() if pattern is not None and "S" in pattern else mask}
        for l, block in enumerate(self.blocks):
            x = block(x, rotary, masks[pattern[l]] if pattern is not None else mask, stats, str(l))
            if stats is not None:
                record_max(stats, f"activation/rms_max_block{l}", x.detach().float().pow(2).mean(dim=-1).sqrt().max())
                record_max(stats, f"activation/abs_max_block{l}", x.detach().abs().max().float())
        return x

    @property
    def logit_clip(self) -> float | None:
        return self.config.logit_clip

    def stat_names(self) -> list[str]:
        """The scalar keys ``forward(..., stats=...)`` fills (it also fills each block's per-head maxima)."""
        return [f"{kind}{l}" for l in range(self.config.num_blocks)
                for kind in ("attention/max_logit_", "attention/max_abs_logit_", "activation/rms_max_block", "activation/abs_max_block")]

    @torch.no_grad()
    def clip_logits(self, stats: dict) -> None:
        """QK-clip (Kimi's MuonClip; ``logit_clip``): each head whose largest |logit| in the forward pass
        that ``stats`` recorded passed ``logit_clip`` gets its q and k rows scaled by
        ``sqrt(logit_clip / largest)``, so that those logits would have been ``logit_clip``. On the
        device, no read."""
        tau, heads, head_dim = self.config.logit_clip, self.config.num_heads, self.config.width // self.config.num_heads
        for l, block in enumerate(self.blocks):
            largest = stats[f"attention/max_abs_logit_per_head_{l}"]
            factor = (tau / largest.clamp(min=tau)).sqrt().to(block.attention.q.weight.dtype)[:, None, None]
            for weight in (block.attention.q.weight, block.attention.k.weight):
                weight.view(heads, head_dim, -1).mul_(factor)

    @torch.no_grad()
    def generate(self, prompt: Tensor, num_tokens: int, temperature: float, generator: torch.Generator,
                 vocab_size: int | None = None) -> Tensor:
        """``num_tokens`` tokens after ``prompt`` (1-d), sampled at ``temperature`` (0: the most likely),
        with the window the model was trained to end with; the context is cropped to ``seq_len``
        (RoPE's trained range). Logits past ``vocab_size`` (a padded vocabulary's unused rows) are never chosen."""
        tokens = prompt.clone()
        window = self.window_blocks(1.0)
        for _ in range(num_tokens):
            logits = self(tokens[-self.config.seq_len :][None], window=window)[0, -1]
            if vocab_size is not None:
                logits = logits[:vocab_size]
            if temperature == 0:
                next_token = logits.argmax()
            else:
                probabilities = torch.softmax(logits.float() / temperature, dim=-1)
                next_token = torch.multinomial(probabilities, 1, generator=generator)[0]
            tokens = torch.cat((tokens, next_token.view(1)))
        return tokens[len(prompt) :]

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
        if self.config.target_norms == "modula":
            targets = gpt_target_norms(self.config.blocks_mass)
        else:
            targets = dict.fromkeys(gpt_target_norms(self.config.blocks_mass), 1.0)
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

    def certificate(self, norms: dict[str, float] | None = None, *, perturbation: float = 0.0) -> GPTCertificate:
        """The sound certificate of docs/certificate.md for ``forward_embedded``, on the domain
        ``certificate.input_radius``: inputs of token RMS at most ``R + perturbation``, with ``R`` the
        larger of 1 and the embedding's largest token RMS (every input the embedding can produce).
        ``perturbation`` > 0 covers every input within that token-RMS distance of one the embedding
        produces too: what a certified margin at that radius needs (``logit_l2_bound``).

        With ``rmsnorm`` / ``layernorm`` there is no certificate (inf): normalisation is not Lipschitz
        near 0. ``tanh`` is 1-Lipschitz and keeps a branch's input RMS below 1.
        """
        norms = dict(norms if norms is not None else self.layer_norms())
        if self.config.embed_max_rms is not None:  # the lookup caps every token vector's RMS
            norms["embed"] = at_most(norms["embed"], self.config.embed_max_rms)
        cfg = self.config
        return gpt_certificate(
            norms, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads, softmax_scale=cfg.softmax_scale,
            residual_scale=cfg.residual_scale, final_scale=cfg.final_scale,
            layernorm_substitute=cfg.layernorm_substitute, gelu=cfg.gelu, perturbation=perturbation,
        )

    def certified_bound(self, norms: dict[str, float] | None = None) -> float:
        """Lipschitz bound of the logits (per-token RMS, max over positions) in the embedded input,
        on every input the embedding can produce (``certificate``)."""
        return self.certificate(norms).bound

    def logit_l2_bound(self, radius: float) -> torch.Tensor:
        """The bound of one position's logits in l2 over the vocabulary, per unit of the embedded
        input's token RMS, for inputs within token-RMS distance ``radius`` of one the embedding can
        produce: the certificate on that enlarged domain times ``sqrt(vocab_size)``. A 0-d tensor on
        the weights' device, computed without waiting for it (the margin loss asks every step)."""
        norms = {"embed": embedding_norm_on_device(self.embedding.weight)}
        norms |= {name: rms_norm_on_device(weight) for name, weight in self.named_matrices().items()}
        return self.certificate(norms, perturbation=radius).bound * math.sqrt(self.config.vocab_size)

    def paper_formula_bound(self, norms: dict[str, float] | None = None) -> float:
        """SPEC §7's formula, for parity with the paper's code only: not a certificate (see core/bounds.py)."""
        if self.config.layernorm_substitute in ("rmsnorm", "layernorm"):
            return math.inf
        norms = norms if norms is not None else self.layer_norms()
        bound = gpt_bound_paper_formula(norms, self.config.num_blocks, self.config.softmax_scale, self.config.residual_scale)
        return bound * self.config.final_scale

    def config_dict(self) -> dict:
        return asdict(self.config)
