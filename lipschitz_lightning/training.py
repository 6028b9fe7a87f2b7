"""The training pipeline behind ``train.py``: compose, check, build, fit, report."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.callbacks import LipschitzMonitor
from lipschitz_lightning.config import validate_config
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.tradeoff import describe

# The data already sits in memory as tensors; worker processes would only add start-up cost.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Lightning 2.6 under torch >= 2.10 warns about its own pytree use on every run; nothing to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _instantiate_all(section: DictConfig | None) -> list:
    return [instantiate(item) for item in (section or {}).values() if item is not None]


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_group(cfg: DictConfig) -> str | None:
    """Inside a Hydra multirun: ``<task_name>/<sweep directory>``, shared by every job of the sweep."""
    if not in_multirun():
        return None
    return f"{cfg.task_name}/{Path(HydraConfig.get().sweep.dir).name}"


def _instantiate_loggers(cfg: DictConfig) -> list:
    loggers = []
    for item in (cfg.get("logger") or {}).values():
        if item is None:
            continue
        if item.get("_target_", "").endswith("WandbLogger"):
            # tagged and grouped so a W&B scatter panel can draw the tradeoff by pair and by sweep
            label = describe(OmegaConf.to_container(cfg, resolve=True))
            tags = list(dict.fromkeys([*(item.get("tags") or []), *label.tags()]))
            loggers.append(instantiate(item, tags=tags, group=item.get("group") or _sweep_group(cfg)))
        else:
            loggers.append(instantiate(item))
    return loggers


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
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = _instantiate_all(cfg.get("callbacks")) + [instantiate(cfg.constraint)]
    loggers = _instantiate_loggers(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(cfg, datamodule, module, callbacks, loggers, trainer)


def train(cfg: DictConfig, run: Run | None = None) -> dict:
    """Train one run; return (and write to ``summary.json``) its final metrics.

    A run that fails leaves a ``summary.json`` with ``status: failed`` and the error, so a sweep's
    report lists it instead of silently dropping it; the exception then propagates. A config
    rejected before any work leaves nothing behind, except inside a sweep, where it is a failed
    grid point like any other.
    """
    resolved = OmegaConf.to_container(cfg, resolve=False)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run = run or build(cfg)
        summary = _fit(run, resolved)
    except Exception as error:
        if isinstance(error, ConfigError) and not in_multirun():
            raise
        step = run.trainer.global_step if run is not None else 0
        _write_summary(cfg, {"status": "failed", "error": f"{type(error).__name__}: {error}", "step": step, "config": resolved})
        raise
    _write_summary(cfg, summary)
    _print_summary(summary)
    return summary


def _fit(run: Run, resolved: dict) -> dict:
    cfg, trainer, module, datamodule, callbacks = run.cfg, run.trainer, run.module, run.datamodule, run.callbacks
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
    return {
        "status": "completed",
        "step": trainer.global_step,
        **metrics,
        "wall_time_s": wall_time,
        "output_dir": str(cfg.paths.output_dir),
        "checkpoint": checkpoints.get("step"),  # the latest state, to resume from
        "best_checkpoint": checkpoints.get("val/acc"),
        "config": resolved,
    }


@rank_zero_only
def _write_summary(cfg: DictConfig, summary: dict) -> None:
    path = Path(cfg.paths.output_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(summary, indent=2, default=str))
    partial.replace(path)


@rank_zero_only
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
