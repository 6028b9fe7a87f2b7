"""The Lightning pipeline end to end on tiny data: composition, callback semantics, resume, errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from lightning.pytorch.callbacks import Callback

from conftest import SPEC_METHODS
from lipschitz_lightning.errors import ConfigError, DataError, TrainingDiverged
from lipschitz_lightning.commands.train import build, train

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = sorted(p.stem for p in (REPO / "conf" / "constraint").glob("*.yaml"))


def test_the_constraint_group_offers_every_method():
    assert CONSTRAINTS == sorted(SPEC_METHODS)


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_optimizer_constraint_pair_composes_and_trains(make_config, optimizer, constraint):
    cfg = make_config(f"optimizer={optimizer}", f"constraint={constraint}", "trainer.max_steps=4", "trainer.val_check_interval=2")
    run = build(cfg)
    before = [p.detach().clone() for p in run.module.parameters()]
    summary = train(cfg, run)
    assert summary["step"] == 4
    assert torch.isfinite(torch.tensor(summary["val/loss"]))
    assert summary["lipschitz/bound"] == pytest.approx(run.module.net.certified_bound(), rel=1e-6)  # of the final weights
    changed = [not torch.equal(b, p) for b, p in zip(before, run.module.parameters())]
    assert all(changed), "every layer must move (zero-init input layer included)"
    assert run.weight_constraint.projection.steps_applied == 4


def test_constraint_runs_once_per_optimizer_step_under_gradient_accumulation(make_config):
    cfg = make_config("constraint=svd_cap", "trainer.max_steps=5", "trainer.accumulate_grad_batches=4", "trainer.val_check_interval=5")
    run = build(cfg)
    seen_lr = []
    projection = run.weight_constraint.projection
    apply = projection.after_step

    def spy(optimizer=None):
        seen_lr.append(run.trainer.optimizers[0].param_groups[0]["lr"])
        apply(optimizer)

    projection.after_step = spy
    train(cfg, run)
    assert run.trainer.global_step == 5
    assert projection.steps_applied == 5
    # the linear decay's lr of each step (lr * (1 - s/5)), read before the scheduler moves on
    lr = cfg.optimizer.lr
    assert seen_lr == pytest.approx([lr * (1 - s / 5) for s in range(5)])


class StopAfter(Callback):
    """Stops the run after optimizer step ``k``, as a killed job would (its last checkpoint is at ``k``)."""

    def __init__(self, k: int):
        self.k = k

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.k:
            trainer.should_stop = True


@pytest.mark.parametrize("constraint", ["spectral_normalize", "spectral_soft_cap"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(make_config, tmp_path, constraint):
    common = [f"constraint={constraint}", "trainer.val_check_interval=4", "trainer.max_steps=8", "constraint.w_max=1.0"]
    straight = build(make_config(*common, output_dir=tmp_path / "straight"))
    train(straight.cfg, straight)

    interrupted = build(make_config(*common, output_dir=tmp_path / "interrupted"))
    interrupted.trainer.callbacks.append(StopAfter(4))
    summary = train(interrupted.cfg, interrupted)
    assert summary["step"] == 4
    checkpoint = summary["checkpoint"]
    assert checkpoint and Path(checkpoint).is_file()

    resumed = build(make_config(*common, f"ckpt_path={checkpoint}", output_dir=tmp_path / "resumed"))
    train(resumed.cfg, resumed)
    assert resumed.trainer.global_step == 8
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_last_checkpoint_holds_the_final_step_even_when_it_is_not_the_best(make_config):
    # mode=min makes an early validation "best"; Lightning's own save_last would then stop
    # following the run, and resuming from last.ckpt would silently go back in time
    cfg = make_config("trainer.max_steps=6", "trainer.val_check_interval=2", "callbacks.best_checkpoint.mode=min")
    summary = train(cfg)
    assert Path(summary["checkpoint"]).name == "last.ckpt"
    assert torch.load(summary["checkpoint"], weights_only=True)["global_step"] == 6
    assert summary["best_checkpoint"] and Path(summary["best_checkpoint"]).is_file()
    assert torch.load(summary["best_checkpoint"], weights_only=True)["global_step"] < 6


@pytest.mark.parametrize(
    "override, key",
    [
        ("constraint.w_max=0", "constraint.w_max"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("constraint.coupling=approximate", "constraint.coupling"),
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_bad_values_are_rejected_before_any_work_naming_the_key(make_config, override, key, tmp_path):
    cfg = make_config(override, output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_unknown_option_gets_hydras_own_error(make_config):
    with pytest.raises(HydraException, match="constraint"):
        make_config("constraint=spectral_magic")


def test_nan_loss_stops_the_run_naming_the_step(make_config):
    # model.net.final_scale=nan, the old way in, is now refused as a setting: poison the head instead
    cfg = make_config("constraint=none", "trainer.max_steps=3")
    run = build(cfg)
    with torch.no_grad():
        run.module.net.layers[-1].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"at step 0"):
        train(cfg, run)


def test_corrupt_parquet_is_a_clear_error_naming_the_file(make_config, tiny_cifar, tmp_path):
    broken = tmp_path / "broken"
    (broken / "cifar10").mkdir(parents=True)
    (broken / "cifar10" / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (broken / "cifar10" / "test.parquet").write_bytes((tiny_cifar / "cifar10" / "test.parquet").read_bytes())
    cfg = make_config(f"data.data_dir={broken}", f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(DataError, match=r"train\.parquet"):
        train(cfg)


@pytest.mark.slow
def test_command_line_error_is_one_line_without_traceback(tiny_cifar, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "constraint.w_max=0", f"paths.data_dir={tiny_cifar}", f"paths.log_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: constraint.w_max must be a number > 0, got 0"
    assert not any(tmp_path.rglob("*.ckpt")) and not any(tmp_path.rglob("config.yaml"))


def wandb_records(path: Path):
    """Records of an offline ``.wandb`` file: the LevelDB log format (32 KiB blocks, records with a
    7-byte header: crc32, length, kind = full / first / middle / last), protobuf ``Record`` inside."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    position, pending = 7, b""
    while position + header <= len(data):
        left = block - position % block
        if left < header:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + header : position + header + length]
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_writes_metrics_and_config(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = make_config("logger=wandb", "trainer.max_steps=4", "trainer.val_check_interval=2", output_dir=out)
    summary = train(cfg)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))

    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("config") for item in r.config.update}
    assert config["constraint"]["_target_"] == "lipschitz_lightning.core.constraints.SpectralSoftCap"
    assert config["optimizer"]["lr"] == cfg.optimizer.lr

    history: dict[str, list[float]] = {}
    for r in records:
        if r.HasField("history"):
            for item in r.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    assert len(history["val/acc"]) == 2
    assert history["val/acc"][-1] == pytest.approx(summary["val/acc"])
    assert history["lipschitz/bound"][-1] == pytest.approx(summary["lipschitz/bound"])
    assert any(r.HasField("exit") for r in records), "the run must be finished, not left open"


def test_tensorboard_logger_writes_event_files(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config("logger=tensorboard", output_dir=out))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
