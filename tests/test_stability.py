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


def fake_run(folder: Path, optimizer: str, lr: float, val_loss: float | None, logits: list[float], spikes: int = 0,
             status: str = "completed", clip: float | None = None) -> None:
    import json

    folder.mkdir(parents=True)
    config = {"optimizer": {"_target_": f"lipschitz_lightning.optim.{optimizer}", "lr": lr, "weight_decay": 0.0},
              "constraint": {"_target_": "lipschitz_lightning.core.constraints.SpectralSoftCap" if optimizer == "Muon" and clip is None
                             else "lipschitz_lightning.core.constraints.NoConstraint", "w_max": 6.0},
              "model": {"net": {"logit_clip": clip}}}
    summary = {"status": status, "step": 200 if status == "completed" else 37, "config": config, "stability/loss_spikes": spikes}
    if val_loss is not None:
        summary["val/loss"] = val_loss
    if status == "failed":
        summary["error"] = "TrainingDiverged: training loss is nan at step 37: the run diverged"
    (folder / "summary.json").write_text(json.dumps(summary))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "stability/attention_max_abs_logit_0", "stability/attention_logit_bound_0",
                         "stability/activation_rms_max_0", "train/loss"])
        for step, value in enumerate(logits):
            writer.writerow([step * 10, value, 100.0, 1.0, ""])
        writer.writerow([len(logits) * 10, "", "", "", 2.0])  # a row of other metrics


def test_the_stability_report_reads_a_sweep(tmp_path):
    from lipschitz_lightning.commands import stability

    fake_run(tmp_path / "0", "Muon", 0.02, 2.3, [1.0, 2.0])
    fake_run(tmp_path / "1", "Muon", 0.1, 2.2, [1.5, 3.0])
    fake_run(tmp_path / "2", "Muon", 0.6, 2.25, [2.0, 9.0], spikes=2)
    fake_run(tmp_path / "3", "AdamW", 0.003, 2.4, [5.0, 50.0])
    fake_run(tmp_path / "4", "AdamW", 0.018, None, [80.0], status="failed")
    fake_run(tmp_path / "5", "Muon", 0.1, 2.3, [3.0], clip=100.0)
    runs = stability.collect([tmp_path])
    assert [r.pair for r in runs].count("muon + spectral_soft_cap") == 3 and "muon + none + QK-clip 100" in {r.pair for r in runs}
    top = next(r for r in runs if r.lr == 0.6)
    assert top.max_logit == 9.0 and top.max_logit_bound == 100.0 and top.logits == [(0, 2.0), (10, 9.0)]
    # within 0.1 nats of the pair's best and no spike: 0.02 and 0.1 (0.6 spiked)
    assert stability.usable_range(runs, "muon + spectral_soft_cap") == (0.02, 0.1)
    assert stability.usable_range(runs, "adamw + none") == (0.003, 0.003)
    table = stability.write(runs, tmp_path / "out")
    assert "diverged at step 37" in table and (tmp_path / "out" / "stability.png").stat().st_size > 0
    assert len((tmp_path / "out" / "stability.csv").read_text().splitlines()) == 7
