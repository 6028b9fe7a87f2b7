"""The training pipeline behind ``train.py``: compose, check, build, fit, report."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.callbacks import LipschitzMonitor
from lipschitz_lightning.config import validate_config

# The data already sits in memory as tensors; worker processes would only add start-up cost.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Lightning 2.6 under torch >= 2.10 warns about its own pytree use on every run; nothing to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _instantiate_all(section: DictConfig | None) -> list:
    return [instantiate(item) for item in (section or {}).values() if item is not None]


@dataclass
class Run:
    """Everything one training run is made of, built from the config."""

    cfg: DictConfig
    datamodule: L.LightningDataModule
    module: L.LightningModule
    callbacks: list
    loggers: list
    trainer: L.Trainer


def build(cfg: DictConfig) -> Run:
    """Check the config, then build data, module, callbacks, loggers and trainer."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # missing or corrupt data fails here, before anything else is built
    module = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    callbacks = _instantiate_all(cfg.get("callbacks")) + [instantiate(cfg.constraint)]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(cfg, datamodule, module, callbacks, loggers, trainer)


def train(cfg: DictConfig, run: Run | None = None) -> dict:
    """Train one run; return (and write to ``summary.json``) its final metrics."""
    run = run or build(cfg)
    trainer, module, datamodule, callbacks = run.trainer, run.module, run.datamodule, run.callbacks
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in run.loggers:
        logger.log_hyperparams(resolved)

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    wall_time = time.perf_counter() - started

    monitor = next((c for c in callbacks if isinstance(c, LipschitzMonitor)), None)
    if monitor is None or monitor.last_validated_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    for logger in run.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # one run per job, also inside a multirun

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "lipschitz/", "norm/"))}
    checkpoints = {c.monitor: c.best_model_path or None for c in callbacks if isinstance(c, ModelCheckpoint)}
    summary = {
        "step": trainer.global_step,
        **metrics,
        "wall_time_s": wall_time,
        "output_dir": str(cfg.paths.output_dir),
        "checkpoint": checkpoints.get("step"),  # the latest state, to resume from
        "best_checkpoint": checkpoints.get("val/acc"),
        "config": resolved,
    }
    if trainer.is_global_zero:
        path = Path(cfg.paths.output_dir) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    norms = ", ".join(f"{k[len('norm/'):]} {v:.3g}" for k, v in summary.items() if k.startswith("norm/"))
    lines = [
        f"step {summary['step']}: val accuracy {summary.get('val/acc', float('nan')):.4f}, "
        f"val loss {summary.get('val/loss', float('nan')):.4f}",
        f"certified Lipschitz bound {summary.get('lipschitz/bound', float('nan')):.4g} (layer norms: {norms})",
        f"logs: {summary['output_dir']}",
        f"checkpoint: {summary['checkpoint']}",
    ]
    print("\n".join(lines), flush=True)
