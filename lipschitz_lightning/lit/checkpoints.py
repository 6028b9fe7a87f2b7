"""Rebuild a trained network from a checkpoint alone (no config, no data), for sampling,
evaluation and certification.

Every checkpoint written by a run carries ``checkpoint["network"]``: the network class, its
constructor arguments and, for character-level language models, the vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from hydra.utils import get_class
from torch import nn

from lipschitz_lightning import CONF_DIR, SWEEPS_DIR
from lipschitz_lightning.errors import ConfigError

STATE_PREFIX = "net."  # the LightningModules keep the network as ``self.net``


@dataclass
class SavedNetwork:
    net: nn.Module  # in eval mode, on the requested device
    target: str  # "package.module.Class" of the network
    config: dict  # its constructor arguments
    vocab: str | None  # the characters of a character-level language model, else None
    tokenizer: str | None  # the tokenizer of a BPE language model (``gpt2``), else None
    path: Path
    checkpoint: dict  # everything else the checkpoint holds (global_step, hyper_parameters, ...)


def network_record(net: nn.Module, vocab: str | None = None, tokenizer: str | None = None) -> dict:
    """What ``on_save_checkpoint`` stores so that ``load_network`` can rebuild ``net``: its class and
    arguments, and a language model's vocabulary (characters) or tokenizer (a name, e.g. ``gpt2``)."""
    return {"target": f"{type(net).__module__}.{type(net).__qualname__}", "config": net.config_dict(), "vocab": vocab,
            "tokenizer": tokenizer}


# What a checkpoint may name. A record or run config is data read from a file: a name outside
# these lists is refused before anything is imported or built, or a checkpoint whose record said
# "subprocess.Popen" would run a command when opened.
NETWORKS = ("lipschitz_lightning.models.mlp.MLP", "lipschitz_lightning.models.gpt.GPT", "lipschitz_lightning.models.vit.ViT")
CONF_DIRS = (CONF_DIR, SWEEPS_DIR)


def named_targets(node) -> Iterator:
    """Every ``_target_`` a config (plain dicts and lists) names, at any depth."""
    if isinstance(node, dict):
        if node.get("_target_") is not None:
            yield node["_target_"]
        for value in node.values():
            yield from named_targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from named_targets(value)


@functools.cache
def configured_targets() -> frozenset[str]:
    """Every ``_target_`` that this project's configs name (its own classes, Lightning's trainer and
    loggers, torch's schedulers): the only ones a run config read from a checkpoint may name."""
    return frozenset(target for directory in CONF_DIRS for path in directory.rglob("*.yaml")
                     for target in named_targets(yaml.safe_load(path.read_text())))


# What the model and data sections of a run config named before the package had its layers
# (conf/model/ then named lipschitz_lightning.modules.<Module>; the networks and datamodules kept
# their names): ``load_network`` still opens a checkpoint written then.
EARLIER_TARGETS = frozenset({"lipschitz_lightning.modules.ClassificationModule", "lipschitz_lightning.modules.LanguageModelModule"})


# The sections of a run config that a command builds from a checkpoint (evaluate, certify and sample
# rebuild its data and its module). The others are only read: a run config may name a user's own
# constraint class there (docs/constraints.md), which nothing imports when the checkpoint is opened.
BUILT_FROM_CHECKPOINT = ("model", "data")


def check_targets(run_config: dict, where: str) -> None:
    """Refuse a run config (read from ``where``) whose sections that get built name a ``_target_``
    this project's configs do not."""
    for target in named_targets([run_config.get(section) for section in BUILT_FROM_CHECKPOINT]):
        if target not in configured_targets() and target not in EARLIER_TARGETS:
            raise ConfigError(f"{where} names {target!r} as a _target_, which no config of this project names: refused, nothing was built")


def check_record(record: dict, where: str) -> None:
    target = record.get("target")
    if target not in NETWORKS:
        raise ConfigError(f"{where} names {target!r} as its network; only this project's networks load ({', '.join(NETWORKS)}): refused, nothing was built")


def load_network(ckpt_path: str | Path, device: str | torch.device = "cpu") -> SavedNetwork:
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path must be an existing checkpoint file, got {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"ckpt_path {str(path)!r} is not a readable checkpoint ({type(error).__name__}: {first_line})") from None
    record = checkpoint.get("network") if isinstance(checkpoint, dict) else None
    if not record:
        raise ConfigError(f"ckpt_path {str(path)!r} has no network record: it was not written by this project's train.py")
    check_record(record, f"ckpt_path {str(path)!r}")
    if checkpoint.get("run_config"):
        check_targets(checkpoint["run_config"], f"the run config of ckpt_path {str(path)!r}")
    net = get_class(record["target"])(**record["config"])
    state = {k[len(STATE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    net.load_state_dict(state)
    return SavedNetwork(net.to(device).eval(), record["target"], record["config"], record.get("vocab"), record.get("tokenizer"),
                        path, checkpoint)
