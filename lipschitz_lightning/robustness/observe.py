"""What a language model's activations and attention logits reach on data, next to what its
certificate bounds them by (docs/certificate.md); the next-token predictions it certifies at a
radius around the embedded text. An observed value above its bound raises ``CertificateBroken``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import head_row_distances
from lipschitz_lightning.errors import CertificateBroken, DataError
from lipschitz_lightning.robustness.certified import PairCertificate
from lipschitz_lightning.robustness.local import covers_gpt, gpt_reach
from lipschitz_lightning.robustness.precision import frozen


@torch.no_grad()
def observe_language_model(net: nn.Module, batches, max_batches: int, stats_tokens: int) -> dict[str, float]:
    """The largest value of every statistic ``net(tokens, stats=...)`` records, over at most
    ``max_batches`` validation batches (each cut to its first ``stats_tokens`` tokens: the model is
    causal, so these are the values those tokens have in the full pass)."""
    observed: dict[str, float] = {}
    window = net.window_blocks(1.0) if hasattr(net, "window_blocks") else None
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        stats: dict = {}
        net(tokens[:, :stats_tokens], stats=stats, window=window)
        for name in net.stat_names():
            observed[name] = max(observed.get(name, -math.inf), float(stats[name]))
    return observed


def compare_blocks(certificate, observed: dict[str, float]) -> list[dict]:
    """Per block: the certified activation-RMS and |logit| bounds next to the observed maxima."""
    rows = []
    for l, (activation, logit) in enumerate(zip(certificate.activation_rms, certificate.attention_logit)):
        rows.append({
            "block": l,
            "activation_rms_certified": activation,
            "activation_rms_observed": observed[f"activation/rms_max_block{l}"],
            "attention_logit_certified": logit,
            "attention_logit_observed": observed[f"attention/max_abs_logit_{l}"],
            "attention_logit_observed_signed_max": observed[f"attention/max_logit_{l}"],
        })
    return rows


def language_model_report(net: nn.Module, batches, max_batches: int, stats_tokens: int, where: str) -> dict:
    """The certificate of ``net`` (``net.certificate()``) and, per block, its bounds next to what at most
    ``max_batches`` of ``batches`` reach (``observe_language_model``, ``compare_blocks``), checked
    (``check_blocks``); ``where`` names the network in an error's message."""
    certificate = net.certificate()
    observed = observe_language_model(net, batches, max_batches, stats_tokens)
    if not observed:
        raise DataError(f"{where}: the validation split gave no batch to observe")
    blocks = compare_blocks(certificate, observed)
    check_blocks(blocks, where)
    return {
        "bound": certificate.bound,
        "bound_paper_formula": net.paper_formula_bound(),
        "input_radius": certificate.input_radius,
        "batches_observed": min(max_batches, len(batches)),
        "blocks": blocks,
    }


def check_blocks(rows: list[dict], where: str) -> None:
    """Every block's observed maxima (``compare_blocks``) at most its certified bounds; ``where`` names
    the network in the message."""
    for row in rows:
        for key in ("activation_rms", "attention_logit"):
            seen, bound = row[f"{key}_observed"], row[f"{key}_certified"]
            # the observations are float32 activations: allow their rounding, nothing more
            if seen > bound * (1 + 1e-4):
                raise CertificateBroken(
                    f"certificate broken: {where}: block {row['block']} reached {key.replace('_', ' ')} {seen:.6g} on the validation data, "
                    f"above its certified bound {bound:.6g}"
                )


@torch.no_grad()
def next_tokens_at_radius(net: nn.Module, batches, radius: float, max_batches: int) -> dict:
    """The next-token predictions of at most ``max_batches`` validation batches that no input within
    token-RMS distance ``radius`` of the embedded text can change (margin > sqrt(2) L_l2 radius, with
    L_l2 from the certificate of the ball of radius R + radius those inputs fill)."""
    enlarged = net.certificate(perturbation=radius)
    margin = math.sqrt(2) * net.logit_l2_bound(radius) * radius
    correct = certified_count = total = 0
    window = net.window_blocks(1.0)
    local = local_counter(net, radius, float(margin))
    for index, (tokens, targets) in enumerate(batches):
        if index >= max_batches:
            break
        counts = net.next_token_loss(net.features(tokens, window=window), targets, margin=margin)
        correct, certified_count, total = correct + int(counts.correct), certified_count + int(counts.certified), total + targets.numel()
        if local is not None:
            local.update(tokens, targets)
    return {"radius": radius, "bound": enlarged.bound, "input_radius": enlarged.input_radius, "margin": float(margin),
            "accuracy": correct / total, "certified_acc": certified_count / total, "positions": total,
            "certified_acc_local": local.certified / total if local is not None else None}


# sequences per pass of the local certificate (Shakespeare's 256 tokens, 4 heads: ~0.3 GB of float64 each pass)
LOCAL_SEQUENCES = 8
# the per-pair table of the head's rows apart is vocabulary^2: past this the local count is left out
LOCAL_MAX_VOCABULARY = 4096


def local_counter(net: nn.Module, radius: float, global_drop: float) -> LocalCount | None:
    """The local certificate's count for a network it covers (the plain causal GPT with a vocabulary
    small enough for its per-pair table), else None."""
    if net.config.vocab_size > LOCAL_MAX_VOCABULARY or not covers_gpt(net):
        return None
    return LocalCount(net, radius, global_drop)


class LocalCount:
    """Next-token predictions certified by the local certificate (``robustness.local.gpt_reach``, per pair
    of tokens ``|c| ||W_y - W_j||`` times the position's bound, or the global ``global_drop`` where that is
    smaller: both hold), counted batch by batch in float64."""

    def __init__(self, net: nn.Module, radius: float, global_drop: float):
        self.net64, self.radius, self.global_drop, self.certified = frozen(net, torch.float64), radius, global_drop, 0
        self.pairs = abs(net.config.final_scale) * head_row_distances(self.net64.head.weight)

    def update(self, tokens: Tensor, targets: Tensor) -> None:
        for part, labels in zip(tokens.split(LOCAL_SEQUENCES), targets.split(LOCAL_SEQUENCES)):
            logits, moves = gpt_reach(self.net64, part, self.radius)
            logits, labels, moves = logits.flatten(0, 1), labels.flatten(), moves.flatten()
            differences = PairCertificate.differences(logits, labels)
            drops = (self.pairs[labels] * moves[:, None]).clamp(max=self.global_drop)
            self.certified += int((differences > drops).all(dim=1).sum())
