"""Evaluate a checkpoint: validation loss, accuracy and the certified Lipschitz bound.

    python -m lipschitz_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.evaluate ckpt_path=... paths.data_dir=/where/the/data/is/now

The checkpoint is enough: it carries the network (``checkpoint["network"]``) and the resolved
config of the run that wrote it (``checkpoint["run_config"]``), from which the validation data is
rebuilt. The numbers are computed as in training (the same module, metrics and monitor), so a
run's ``last.ckpt`` gives back the run's final summary. Settings in ``conf/evaluate.yaml``.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.errors import ConfigError, DataError, LipschitzLightningError, exit_with


def data_config(cfg: DictConfig, run_data: dict) -> DictConfig:
    """The run's data settings, with this command's ``paths.*`` and ``data.*`` on top."""
    data = OmegaConf.create(run_data)
    for key in ("data_dir", "cache_dir"):
        value = cfg.paths.get(key)
        if value is not None and key in data:
            data[key] = value
    for key, value in cfg.get("data", {}).items():
        if value is None:
            continue
        if key not in data:
            raise ConfigError(f"data.{key} is not a setting of the run's data ({data._target_}); it has: {', '.join(k for k in data if not k.startswith('_'))}")
        data[key] = value
    return data


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the checkpoint's network on its run's validation data; return the metrics."""
    import lightning as L
    from hydra.utils import get_class, instantiate

    from lipschitz_lightning.callbacks import LipschitzMonitor
    from lipschitz_lightning.checkpoints import load_network
    from lipschitz_lightning.config import validate_config

    if cfg.device not in ("auto", "cpu", "cuda", "gpu", "mps"):
        raise ConfigError(f"device must be one of auto, cpu, cuda, mps, got {cfg.device!r}")
    saved = load_network(cfg.ckpt_path)
    run_config = saved.checkpoint.get("run_config")
    if not run_config or "data" not in run_config or "model" not in run_config:
        raise ConfigError(
            f"ckpt_path {str(saved.path)!r} carries no run config (it was written before checkpoints recorded one), "
            f"so its validation data is unknown; train it again, or evaluate its network with lipschitz_lightning.checkpoints.load_network"
        )
    data = data_config(cfg, run_config["data"])
    validate_config(OmegaConf.create({"model": run_config["model"], "data": data}))

    datamodule = instantiate(data)
    datamodule.prepare_data()  # missing data: the same one-line error as train.py
    datamodule.setup("validate")
    vocab = getattr(datamodule, "vocab", None)
    if saved.vocab and vocab is not None and vocab.chars != saved.vocab:
        raise DataError(f"the text in {data.data_dir} has another vocabulary than the checkpoint's: it is not the data the run trained on")

    model = {k: v for k, v in run_config["model"].items() if k not in ("_target_", "net")}
    module = get_class(run_config["model"]["_target_"])(net=saved.net, optimizer=None, **model)
    if hasattr(module, "vocab_chars"):
        module.vocab_chars = saved.vocab
    accelerator = {"auto": "auto", "cuda": "gpu"}.get(cfg.device, cfg.device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        callbacks=[LipschitzMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "lipschitz/", "norm/"))}
    return {"step": int(saved.checkpoint.get("global_step", 0)), **metrics}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    import logging

    import lightning  # noqa: F401  (it sets its loggers' levels on import)

    from lipschitz_lightning.cli import quiet_known_warnings

    quiet_known_warnings()

    # Lightning's notices (accelerator found, ...) would bury the three numbers asked for
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from lipschitz_lightning.training import summary_lines

        metrics = evaluate(cfg)
    except LipschitzLightningError as error:
        exit_with(error)
    print(f"checkpoint: {cfg.ckpt_path}", flush=True)
    print("\n".join(summary_lines(metrics, metrics["step"])), flush=True)


if __name__ == "__main__":
    main()
