"""A trained run, from its checkpoint alone: the network, the run's config and its validation data
(``evaluate`` and ``certify`` both start here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.errors import ConfigError, DataError


@dataclass
class Loaded:
    path: Path
    saved: object  # lit.checkpoints.SavedNetwork
    run_config: dict
    datamodule: object  # set up for validation


def data_config(cfg, run_data: dict) -> DictConfig:
    """The run's data settings, with the command's ``paths.*`` and ``data.*`` on top (``cfg``: the
    command's checked settings, ``config.settings.COMMAND_SETTINGS``)."""
    data = OmegaConf.create(run_data)
    for key in ("data_dir", "cache_dir"):
        value = getattr(cfg.paths, key, None)
        if value is not None and key in data:
            data[key] = value
    for key, value in (cfg.data or {}).items():
        if value is None:
            continue
        if key not in data:
            raise ConfigError(f"data.{key} is not a setting of the run's data ({data._target_}); it has: {', '.join(k for k in data if not k.startswith('_'))}")
        data[key] = value
    return data


def load_run(cfg, ckpt_path: str, require_model: bool = False) -> Loaded:
    """The checkpoint's network (``lit.checkpoints.load_network``: only this project's classes) and its
    run's validation data, rebuilt from the run config it carries, with ``cfg``'s ``paths.*`` and
    ``data.*`` on top; every setting checked first, the data's absence one line."""
    from hydra.utils import instantiate

    from lipschitz_lightning.config.settings import validate_config
    from lipschitz_lightning.lit.checkpoints import load_network

    saved = load_network(ckpt_path)
    run_config = saved.checkpoint.get("run_config")
    if not run_config or "data" not in run_config or (require_model and "model" not in run_config):
        raise ConfigError(
            f"ckpt_path {ckpt_path!r} carries no run config (it was written before checkpoints recorded one), so its "
            f"validation data is unknown: train it again, or load its network with lipschitz_lightning.lit.checkpoints.load_network"
        )
    data = data_config(cfg, run_config["data"])
    if "model" in run_config:
        validate_config(OmegaConf.create({"model": run_config["model"], "data": data}))
    datamodule = instantiate(data)
    datamodule.prepare_data()  # missing data: the one-line error of train.py
    datamodule.setup("validate")
    vocab = getattr(datamodule, "vocab", None)
    if saved.vocab and vocab is not None and getattr(vocab, "chars", saved.vocab) != saved.vocab:
        raise DataError(f"the text in {data.data_dir} has another vocabulary than the checkpoint {ckpt_path!r}: it is not the data the run trained on")
    return Loaded(Path(ckpt_path), saved, run_config, datamodule)
