"""What a language model's activations and attention logits reach on data, next to what its
certificate bounds them by (docs/certificate.md)."""

from __future__ import annotations

import math

import torch
from torch import nn


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
