"""The stability instruments (issue 25's first claim): every logging step records each block's
largest attention logit and activation RMS of the training forward pass itself, beside the
certificate's bounds; loss spikes are counted; QK-clip (Kimi's MuonClip) is the baseline the
constraints are compared with."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, QUIET_TRAINER
from lipschitz_lightning.commands.train import build, train
from lipschitz_lightning.lit.modules import LossSpikes
from lipschitz_lightning.models import GPT
from lipschitz_lightning.models.gpt import STATS_QUERIES, AttentionMask, apply_rotary, record_logits
from test_gpt import gpt_overrides


def written_out_logits(net: GPT, x: torch.Tensor, block: int = 0) -> torch.Tensor:
    """Block ``block``'s causal pre-softmax logits for embedded input ``x`` (``block`` 0: no mixing before)."""
    attention = net.blocks[block].attention
    batch, seq, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    q, k = (proj(x).view(batch, seq, heads, head_dim).transpose(1, 2) for proj in (attention.q, attention.k))
    q, k = apply_rotary(q, net.rotary_cos, net.rotary_sin), apply_rotary(k, net.rotary_cos, net.rotary_sin)
    logits = (q @ k.transpose(-1, -2)) * attention.scale
    return logits.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("nan"))


def test_the_recorded_logits_are_the_written_out_ones_per_head():
    torch.manual_seed(0)
    net = GPT(vocab_size=11, width=16, num_heads=4, num_blocks=2, seq_len=8, zero_init=False, softmax_scale=3.0)
    tokens = torch.randint(0, 11, (5, 8))
    stats: dict = {}
    with torch.no_grad():
        net(tokens, stats=stats)
        logits = written_out_logits(net, net.embed(tokens))
    per_head = logits.abs().nan_to_num(0).amax(dim=(0, 2, 3))
    torch.testing.assert_close(stats["attention/max_abs_logit_per_head_0"], per_head)
    assert float(stats["attention/max_abs_logit_0"]) == pytest.approx(float(per_head.max()))
    assert float(stats["attention/max_logit_0"]) == pytest.approx(float(logits.nan_to_num(-math.inf).max()))


def test_a_long_sequence_records_the_first_sequence_s_first_queries():
    q = torch.randn(3, 2, STATS_QUERIES + 64, 4, generator=torch.Generator().manual_seed(1))
    stats: dict = {}
    record_logits(q, q, 1.0, AttentionMask(), stats, "0")
    head = q[:1, :, :STATS_QUERIES]
    expected = (head @ head.transpose(-1, -2)).tril().abs().amax(dim=(0, 2, 3))  # causal: the first queries see only the first keys
    torch.testing.assert_close(stats["attention/max_abs_logit_per_head_0"], expected)


def test_qk_clip_brings_every_head_s_largest_logit_back_to_tau():
    torch.manual_seed(2)
    net = GPT(vocab_size=11, width=16, num_heads=4, num_blocks=1, seq_len=8, zero_init=False, softmax_scale=40.0, logit_clip=55.0)
    tokens = torch.randint(0, 11, (6, 8))
    stats: dict = {}
    with torch.no_grad():
        net(tokens, stats=stats)
    before = stats["attention/max_abs_logit_per_head_0"]
    assert float(before.max()) > 55.0 and float(before.min()) < 55.0  # some heads above tau, some below
    net.clip_logits(stats)
    with torch.no_grad():
        after = written_out_logits(net, net.embed(tokens)).abs().nan_to_num(0).amax(dim=(0, 2, 3))
    torch.testing.assert_close(after, before.clamp(max=55.0), rtol=1e-5, atol=1e-4)


def test_a_spike_is_a_loss_above_1_5_times_the_running_median():
    spikes = LossSpikes(factor=1.5, window=10)
    spikes.update([2.0 - 0.01 * i for i in range(30)])  # a smooth decrease: no spike
    assert spikes.count == 0
    spikes.update([3.0, 1.7, 1.69, 10.0])
    assert spikes.count == 2


def test_every_logging_step_records_the_forward_pass_beside_the_certificate(shared_data_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    overrides = gpt_overrides(shared_data_dir, "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.log_every_n_steps=2",
                              *QUIET_TRAINER, f"paths.output_dir={tmp_path}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    logged = [row for row in rows if row.get("stability/attention_max_abs_logit_0")]
    assert len(logged) == 3  # steps 0, 2, 4
    for row in logged:
        for l in range(2):
            assert 0 < float(row[f"stability/attention_max_abs_logit_{l}"]) <= float(row[f"stability/attention_logit_bound_{l}"])
            assert float(row[f"stability/attention_max_logit_{l}"]) <= float(row[f"stability/attention_max_abs_logit_{l}"])
            assert 0 < float(row[f"stability/activation_rms_max_{l}"]) <= float(row[f"stability/activation_rms_bound_{l}"])
    assert summary["stability/loss_spikes"] >= 0


def test_a_run_with_qk_clip_keeps_its_logits_near_tau(shared_data_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    overrides = gpt_overrides(shared_data_dir, "constraint=none", "model.net.logit_clip=2.0", "optimizer.lr=0.3",
                              "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1",
                              *QUIET_TRAINER, f"paths.output_dir={tmp_path}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = build(cfg)
    train(cfg, run)
    # a step's forward sees the weights the last clip left: at most tau up to the one step's change
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    reached = [float(row["stability/attention_max_abs_logit_0"]) for row in rows if row.get("stability/attention_max_abs_logit_0")]
    assert len(reached) == 8 and max(reached[1:]) < 2.0 * 1.5
