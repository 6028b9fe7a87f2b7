"""Evaluate a checkpoint: validation loss, accuracy and the certified Lipschitz bound.

    python -m lipschitz_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.evaluate ckpt_path=... paths.data_dir=/where/the/data/is/now

The checkpoint is enough: it carries the network (``checkpoint["network"]``) and the resolved
config of the run that wrote it (``checkpoint["run_config"]``), from which the validation data is
rebuilt. The numbers are computed as in training (the same module and metrics, and the bound logged
by the constraint's callback, which projects nothing here), so a run's ``last.ckpt`` gives back the
run's final summary. Settings in ``conf/evaluate.yaml``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lipschitz_lightning.errors import LipschitzLightningError, exit_with


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the checkpoint's network on its run's validation data; return the metrics."""
    import lightning as L
    from hydra.utils import get_class

    from lipschitz_lightning.commands.runs import load_run
    from lipschitz_lightning.core.constraints import NoConstraint
    from lipschitz_lightning.lit.constraint import WeightConstraint

    loaded = load_run(cfg, cfg.ckpt_path, require_model=True)
    saved, run_config = loaded.saved, loaded.run_config
    model = {k: v for k, v in run_config["model"].items() if k not in ("_target_", "net")}
    module = get_class(run_config["model"]["_target_"])(net=saved.net, optimizer=None, **model)
    if hasattr(module, "vocab_chars"):
        module.vocab_chars = saved.vocab
    accelerator = {"auto": "auto", "cuda": "gpu"}.get(cfg.device, cfg.device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        callbacks=[WeightConstraint(NoConstraint())],  # projects nothing; logs the layer norms and the certified bound
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, datamodule=loaded.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "lipschitz/", "norm/"))}
    if getattr(loaded.datamodule, "holds_out_validation", False):  # validation held out of training: the test split too
        trainer.test(module, datamodule=loaded.datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}  # test() replaced val's
    return {"step": int(saved.checkpoint.get("global_step", 0)), **metrics}


def run(cfg: DictConfig) -> None:
    """The command, once its settings are checked (``commands.cli.command_main``)."""
    import logging

    import lightning  # noqa: F401  (it sets its loggers' levels on import)

    from lipschitz_lightning.commands.cli import quiet_known_warnings
    from lipschitz_lightning.commands.train import summary_lines

    quiet_known_warnings()
    # Lightning's notices (accelerator found, ...) would bury the three numbers asked for
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        metrics = evaluate(cfg)
    except LipschitzLightningError as error:
        exit_with(error)
    print(f"checkpoint: {cfg.ckpt_path}", flush=True)
    print("\n".join(summary_lines(metrics, metrics["step"])), flush=True)


def main(argv: list[str] | None = None) -> None:
    from lipschitz_lightning.commands.cli import command_main

    command_main("evaluate", argv)


if __name__ == "__main__":
    main()
