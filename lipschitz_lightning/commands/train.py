"""The training pipeline behind ``train.py``: compose, check, build, fit, report."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.config.settings import validate_config
from lipschitz_lightning.config.tradeoff import describe
from lipschitz_lightning.errors import ConfigError, Preempted
from lipschitz_lightning.lit.callbacks import FinalValidation
from lipschitz_lightning.lit.checkpoints import check_record, check_targets
from lipschitz_lightning.lit.constraint import WeightConstraint

# The run's own messages; under train.py, Hydra's job logging (conf/hydra/job_logging/) sends them
# to the console and to <run dir>/train.log.
log = logging.getLogger("lipschitz_lightning")


def _instantiate_all(section: DictConfig | None) -> list:
    return [instantiate(item) for item in (section or {}).values() if item is not None]


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_group(cfg: DictConfig) -> str | None:
    """Inside a Hydra multirun: ``<task_name>/<sweep directory>``, shared by every job of the sweep."""
    if not in_multirun():
        return None
    return f"{cfg.task_name}/{Path(HydraConfig.get().sweep.dir).name}"


def _instantiate_loggers(cfg: DictConfig, resumed_step: int | None) -> list:
    loggers = []
    for item in (cfg.get("logger") or {}).values():
        if item is None:
            continue
        if item.get("_target_", "").endswith("WandbLogger"):
            # tagged and grouped so a W&B scatter panel can draw the tradeoff by pair and by sweep
            label = describe(OmegaConf.to_container(cfg, resolve=True))
            tags = list(dict.fromkeys([*(item.get("tags") or []), *label.tags()]))
            loggers.append(instantiate(item, tags=tags, group=item.get("group") or _sweep_group(cfg)))
        elif item.get("_target_", "").endswith("CSVLogger") and _holds_metrics(item):
            # Lightning's CSV logger deletes an existing metrics.csv: a resumed run writes its own beside it
            loggers.append(instantiate(item, version=f"resumed-step{resumed_step or 0}"))
        else:
            loggers.append(instantiate(item))
    return loggers


def _holds_metrics(item: DictConfig) -> bool:
    version = item.get("version")
    return (Path(item.save_dir) / str(item.get("name") or "") / str(version if version is not None else "") / "metrics.csv").is_file()


# ----------------------------------------------------------------------------- resuming

# What a resumed run keeps. Lightning restores the optimizer's and the scheduler's state from the
# checkpoint whatever the config says (a new optimizer.lr would be silently ignored), and the rest
# defines the run; trainer devices and intervals, loggers, callbacks and paths may change.
RESUME_KEEPS = ("seed", "model", "data", "optimizer", "scheduler", "constraint", "loss", "trainer.accumulate_grad_batches")
RESUME_MAY_CHANGE = ("data.data_dir", "data.dir", "data.cache_dir", "data.val_batch_size", "model.compile", "model.stats_tokens")
_ABSENT = "<absent>"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _kept_settings(config: dict) -> dict[str, Any]:
    flat = _flatten(config)
    return {
        key: value
        for key, value in flat.items()
        if any(key == k or key.startswith(k + ".") for k in RESUME_KEEPS) and key not in RESUME_MAY_CHANGE
    }


def check_resume(cfg: DictConfig) -> int | None:
    """Before resuming from ``cfg.ckpt_path``, make sure the run it continues is this one.

    Returns the checkpoint's step (None without ``ckpt_path``). A checkpoint restores the optimizer
    and the learning-rate schedule as they were: resuming with another ``trainer.max_steps`` would
    train on at learning rate 0 past the old schedule's end (a frozen run), and another
    ``optimizer.lr`` would be ignored. Any such difference is one ``ConfigError`` line instead.
    """
    path = cfg.get("ckpt_path")
    if not path:
        return None
    if not Path(str(path)).is_file():
        raise ConfigError(f"ckpt_path must be an existing checkpoint file, got {str(path)!r}")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        step = int(checkpoint["global_step"])
    except Exception as error:
        raise ConfigError(f"ckpt_path {str(path)!r} is not a readable Lightning checkpoint ({type(error).__name__}: {error})") from None
    max_steps = cfg.trainer.max_steps
    if cfg.get("resume"):
        hint = "or start a new run to change it"
    else:
        hint = "or resume=<run dir> to continue with the run's own settings"

    schedulers = checkpoint.get("lr_schedulers") or [{}]
    schedule_end = schedulers[0].get("total_iters")
    # the schedule's end follows trainer.max_steps (scheduler.total_iters: ${trainer.max_steps}): that
    # difference is the schedule's message below, checked last, so that its advice is the last step
    follows_max_steps = OmegaConf.select(cfg, "scheduler.total_iters", default=None) == max_steps
    check_record(checkpoint.get("network") or {}, f"ckpt_path {str(path)!r}")
    run_config = checkpoint.get("run_config")
    if run_config:
        check_targets(run_config, f"the run config of ckpt_path {str(path)!r}")
        then, now = _kept_settings(run_config), _kept_settings(OmegaConf.to_container(cfg, resolve=True))
        for key in sorted(then.keys() | now.keys()):
            if key == "scheduler.total_iters" and follows_max_steps:
                continue
            if then.get(key, _ABSENT) != now.get(key, _ABSENT):
                raise ConfigError(
                    f"{key} is {now.get(key, _ABSENT)!r} here but {then.get(key, _ABSENT)!r} in the run of {str(path)!r}: "
                    f"a resumed run keeps its seed, model, data, optimizer, scheduler and constraint; drop the override, {hint}"
                )
    if schedule_end and follows_max_steps and schedule_end != max_steps:
        raise ConfigError(
            f"trainer.max_steps is {max_steps}, but the checkpoint's learning rate decays to 0 at step {schedule_end} "
            f"(scheduler.total_iters) and a resumed run keeps its schedule: give trainer.max_steps={schedule_end}, {hint}"
        )
    if step >= max_steps:
        raise ConfigError(
            f"trainer.max_steps must be above the checkpoint's step {step} to resume from it, got {max_steps}: the run is complete"
        )
    return step


@dataclass
class Run:
    """Everything one training run is made of, built from the config."""

    cfg: DictConfig
    datamodule: L.LightningDataModule
    module: L.LightningModule
    callbacks: list
    loggers: list
    trainer: L.Trainer

    @property
    def weight_constraint(self) -> WeightConstraint | None:
        """The callback that projects the weights after every step (``conf/callbacks/``)."""
        return next((c for c in self.trainer.callbacks if isinstance(c, WeightConstraint)), None)


def build(cfg: DictConfig, checked: bool = False) -> Run:
    """Check the config (unless the command line already did: ``checked``), then build data, module,
    callbacks, loggers and trainer."""
    if not checked:
        validate_config(cfg)
    resumed_step = check_resume(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # missing or corrupt data fails here, before anything else is built
    loss = instantiate(cfg.loss) if cfg.get("loss") is not None else None
    module = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler), loss=loss)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = _instantiate_all(cfg.get("callbacks")) + [FinalValidation()]
    loggers = _instantiate_loggers(cfg, resumed_step)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(cfg, datamodule, module, callbacks, loggers, trainer)


def train(cfg: DictConfig, run: Run | None = None) -> dict:
    """Train one run; return (and write to ``summary.json``) its final metrics.

    A run that fails while training leaves a ``summary.json`` with ``status: failed`` and the
    error, so a sweep's report lists it instead of silently dropping it; the exception then
    propagates. A run that fails before training (``build``: config or data) leaves nothing
    behind, except inside a sweep, where it is a failed grid point like any other.
    """
    resolved = _resolved(cfg)
    if run is None:
        try:
            run = build(cfg)
        except Exception as error:
            if in_multirun():
                record_failure(cfg, error)
            raise
    try:
        summary = _fit(run, resolved)
    except SIGTERMException:
        step, output_dir = run.trainer.global_step, Path(cfg.paths.output_dir)
        checkpoint = output_dir / "checkpoints" / "last.ckpt"
        _write_summary(cfg, {"status": "preempted", "step": step, "checkpoint": str(checkpoint), "config": resolved})
        raise Preempted(
            f"stopped by SIGTERM at step {step}; the checkpoint {checkpoint} resumes it: python train.py resume={output_dir}"
        ) from None
    except Exception as error:
        record_failure(cfg, error, step=run.trainer.global_step)
        raise
    _write_summary(cfg, summary)
    _report(summary)
    return summary


def record_failure(cfg: DictConfig, error: Exception, step: int = 0) -> None:
    """Write the failed run's ``summary.json``; inside a sweep, also its one line on the console."""
    resolved = _resolved(cfg)
    _write_summary(cfg, {"status": "failed", "error": f"{type(error).__name__}: {error}", "step": step, "config": resolved})
    if in_multirun():
        _log_rank_zero(logging.ERROR, f"job {HydraConfig.get().job.num} failed: {_label(resolved)}: {type(error).__name__}: {error}")


def _resolved(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot resolve is itself the error being reported
        return OmegaConf.to_container(cfg, resolve=False)


def _fit(run: Run, resolved: dict) -> dict:
    cfg, trainer, module, datamodule, callbacks = run.cfg, run.trainer, run.module, run.datamodule, run.callbacks
    for logger in run.loggers:
        logger.log_hyperparams(resolved)

    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    wall_time = time.perf_counter() - started

    monitor = run.weight_constraint
    if monitor is None or monitor.last_validated_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    for logger in run.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # one run per job, also inside a multirun

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(("val/", "lipschitz/", "norm/", "constraint/", "stability/"))}
    if getattr(datamodule, "holds_out_validation", False):
        # validation came from the training images (what a search tunes on); the test split is reported once, at the end
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if metrics.get("lipschitz/bound", 0) > 0:
        metrics["lipschitz/log10_bound"] = math.log10(metrics["lipschitz/bound"])
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


def summary_lines(metrics: dict, step: int) -> list[str]:
    """A run's result in two lines: validation accuracy and loss, then the certificate."""
    norms = ", ".join(f"{k[len('norm/'):]} {v:.3g}" for k, v in metrics.items() if k.startswith("norm/"))
    test = f"; test accuracy {metrics['test/acc']:.4f}" if "test/acc" in metrics else ""
    return [
        f"step {step}: val accuracy {metrics.get('val/acc', float('nan')):.4f}, val loss {metrics.get('val/loss', float('nan')):.4f}{test}",
        f"certified Lipschitz bound {metrics.get('lipschitz/bound', float('nan')):.4g} (layer norms: {norms})",
    ]


def _label(config: dict) -> str:
    """The run's place on the tradeoff plot: its pair and the knob it turns."""
    try:
        label = describe(config)
    except (KeyError, TypeError, ValueError, AttributeError):
        return "(pair unknown)"
    knob = f"w_max={label.w_max:g}" if label.w_max is not None else f"weight_decay={label.weight_decay:g}"
    return f"{label.pair}, {knob}"


@rank_zero_only
def _log_rank_zero(level: int, message: str) -> None:
    log.log(level, message)


def _report(summary: dict) -> None:
    """A single run's summary; in a sweep, one line per finished job, so the sweep can be watched."""
    if in_multirun():
        _log_rank_zero(
            logging.INFO,
            f"job {HydraConfig.get().job.num} done: {_label(summary['config'])}: "
            f"val accuracy {summary.get('val/acc', float('nan')):.4f}, bound {summary.get('lipschitz/bound', float('nan')):.4g} "
            f"(step {summary['step']}, {summary['wall_time_s'] / 60:.1f} min)",
        )
        return
    for line in (*summary_lines(summary, summary["step"]), f"logs: {summary['output_dir']}", f"checkpoint: {summary['checkpoint']}"):
        _log_rank_zero(logging.INFO, line)
