"""A checkpoint is data: a record or run config naming anything but this project's classes is refused
with one line before any object is built, by sample, evaluate, certify and resume alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_cifar) -> Path:
    """A finished tiny CIFAR run: its directory, with .hydra/overrides.yaml and checkpoints/last.ckpt."""
    run_dir = tmp_path_factory.mktemp("run")
    result = subprocess.run(
        [sys.executable, "train.py", f"paths.data_dir={tiny_cifar}", f"paths.cache_dir={tiny_cifar / 'cache'}",
         "data.batch_size=32", "data.val_batch_size=64", "model.net.width=32", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "scheduler=constant", f"hydra.run.dir={run_dir}", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def poisoned(run_dir: Path, tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint asks to run ``touch <marker>``: through its network record
    (``where="record"``) or a ``_target_`` in its run config (``where="run_config"``)."""
    marker = tmp_path / "the command ran"
    copy = tmp_path / "poisoned"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (copy / ".hydra" / name).write_bytes((run_dir / ".hydra" / name).read_bytes())
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    payload = {"args": ["touch", str(marker)]}
    if where == "record":
        checkpoint["network"] = {"target": "subprocess.Popen", "config": payload, "vocab": None, "tokenizer": None}
    else:
        checkpoint["run_config"]["data"] = {"_target_": "subprocess.Popen", **payload}
    torch.save(checkpoint, copy / "checkpoints" / "last.ckpt")
    return copy, marker


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["record", "run_config"])
@pytest.mark.slow
def test_sample_evaluate_certify_and_resume_refuse_a_checkpoint_that_names_a_foreign_class(trained_run, tmp_path, where):
    run_dir, marker = poisoned(trained_run, tmp_path, where)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    runs = {
        "sample": command("-m", "lipschitz_lightning.sample", f"ckpt_path={checkpoint}"),
        "evaluate": command("-m", "lipschitz_lightning.evaluate", f"ckpt_path={checkpoint}"),
        "certify": command("-m", "lipschitz_lightning.certify", f"ckpt_path={checkpoint}", f"out_dir={tmp_path / 'certified'}"),
        "resume": command("train.py", f"resume={run_dir}", "trainer.max_steps=4"),
    }
    for name, result in runs.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines, f"{name}: {result.returncode} {result.stderr[-2000:]}"
        assert lines[-1].startswith("error: ") and "subprocess.Popen" in lines[-1] and "refused" in lines[-1], f"{name}: {lines[-1]}"
        assert "Traceback" not in result.stderr, name
    assert not marker.exists()  # nothing was built, nothing ran


def test_a_checkpoint_of_this_project_still_loads(trained_run):
    from lipschitz_lightning.lit.checkpoints import load_network

    saved = load_network(trained_run / "checkpoints" / "last.ckpt")
    assert saved.target == "lipschitz_lightning.models.mlp.MLP" and saved.checkpoint["global_step"] == 2


def test_a_checkpoint_trained_with_a_user_s_own_constraint_loads_without_importing_it(trained_run, tmp_path):
    # the constraint section is read, never built, when a checkpoint is opened: a user's class there
    # (docs/constraints.md) is fine, and is not imported
    from lipschitz_lightning.lit.checkpoints import load_network

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["run_config"]["constraint"] = {"_target_": "my_constraints.SpectralClip", "w_max": 2.0}
    torch.save(checkpoint, tmp_path / "user.ckpt")
    assert load_network(tmp_path / "user.ckpt").target == "lipschitz_lightning.models.mlp.MLP"
    assert "my_constraints" not in sys.modules


def test_a_run_config_of_before_the_layers_passes_and_other_earlier_names_do_not():
    # the model section named lipschitz_lightning.modules.<Module> then; the callbacks, the strategy and
    # the constraint were never in a section that gets built, so their earlier names admit nothing
    from lipschitz_lightning.errors import ConfigError
    from lipschitz_lightning.lit.checkpoints import check_targets

    earlier = {"model": {"_target_": "lipschitz_lightning.modules.ClassificationModule",
                         "net": {"_target_": "lipschitz_lightning.models.MLP"}},
               "data": {"_target_": "lipschitz_lightning.data.CIFAR10DataModule"},
               "callbacks": {"monitor": {"_target_": "lipschitz_lightning.callbacks.LipschitzMonitor"}}}
    check_targets(earlier, "an earlier run config")
    for name in ("lipschitz_lightning.callbacks.LipschitzMonitor", "lipschitz_lightning.projection.Constraint"):
        with pytest.raises(ConfigError, match="refused"):
            check_targets({"data": {"_target_": name}}, "a run config")
