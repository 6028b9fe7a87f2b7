"""Checks on the composed config, run before anything is built.

Hydra already rejects unknown groups, options and keys of the yaml files. What is left is derived
from the code, not from a hand-kept list:

- every key of a ``_target_`` section must be a parameter of its target (say ``optimizer.momentum``
  left over after switching to AdamW);
- every value must fit its parameter's annotation (``schema.py``): type, range, choices. The
  GPT's settings are the fields of ``GPTConfig`` (``config_schema``);
- a few relations across keys (heads divide the width, the model fits the data, the trainer's
  precision keeps projected weights exact, the sweep level exists).

Every failure is one line naming the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.schema import PositiveInt, check

_ABSENT = object()
PACKAGE = "lipschitz_lightning."
TARGET_SECTIONS = ("optimizer", "scheduler", "constraint", "data", "model", "model.net")

# Lightning's precision settings. 16-bit "-true" settings store the weights in 16 bits, whose
# rounding after a projection can push a weight past w_max: refused with a constraint (below).
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", 64, 32, "64", "32")
LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true")

# Settings of train.yaml itself, outside any group.
TOP_LEVEL_SETTINGS: dict[str, Any] = {"keep_freed_memory": bool}

# The trainer is Lightning's; these are the settings this project's runs rely on.
TRAINER_SETTINGS: dict[str, Any] = {
    "max_steps": PositiveInt,
    "accumulate_grad_batches": PositiveInt,
    "val_check_interval": PositiveInt,  # steps between validations (epochs play no role)
    "log_every_n_steps": PositiveInt,
    "num_nodes": PositiveInt,
    "precision": Literal[PRECISIONS],
}


def target_settings(target: str) -> dict[str, Any] | None:
    """Parameter name -> type hint of a ``_target_`` of this package (None for other libraries').

    A target that takes ``**config`` names its schema in ``config_schema`` (a dataclass)."""
    if not target.startswith(PACKAGE):
        return None
    obj = get_object(target)
    schema = getattr(obj, "config_schema", None)
    if schema is not None:
        return typing.get_type_hints(schema, include_extras=True)
    function = obj.__init__ if inspect.isclass(obj) else obj
    hints = typing.get_type_hints(function, include_extras=True)
    return {name: hints.get(name, Any) for name in inspect.signature(function).parameters if name not in ("self", "params")}


def _check_keys_accepted(cfg: DictConfig, section: str) -> None:
    """Every key of a ``_target_`` section must be a parameter of its target, caught here rather
    than as a TypeError after the data has loaded."""
    node = OmegaConf.select(cfg, section, default=None)
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return
    obj = get_object(node._target_)
    schema = getattr(obj, "config_schema", None)
    if schema is not None:
        allowed = [field.name for field in dataclasses.fields(schema)]
    else:
        try:
            parameters = inspect.signature(obj).parameters
        except (ValueError, TypeError):
            return
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        allowed = [name for name in parameters if name not in ("self", "params", "optimizer")]
    for key in node:
        if not str(key).startswith("_") and key not in allowed and key not in ("net",):
            raise ConfigError(f"{section}.{key} is not a setting of {node._target_}; allowed: {', '.join(allowed)}")


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _check_value(key: str, value: Any, hint: Any) -> None:
    ok, description = check(value, hint)
    if not ok:
        raise ConfigError(f"{key} must be {description}, got {value!r}")


def _check_section_values(cfg: DictConfig, section: str) -> None:
    node = OmegaConf.select(cfg, section, default=None)
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return
    settings = target_settings(node._target_)
    if settings is None:
        return
    for key in node:
        if str(key).startswith("_") or key not in settings or OmegaConf.is_dict(node[key]) and "_target_" in node[key]:
            continue
        _check_value(f"{section}.{key}", _value(cfg, f"{section}.{key}"), settings[key])


# ---------------------------------------------------------------------------- relations across keys


def _heads_divide_width(cfg: DictConfig) -> tuple[bool, str]:
    width, heads = cfg.model.net.width, cfg.model.net.num_heads
    return width % heads == 0 and (width // heads) % 2 == 0, f"a divisor of model.net.width={width} leaving an even head size (RoPE)"


def _level_in_grid(cfg: DictConfig) -> tuple[bool, str]:
    sizes = {len(values) for values in (cfg.tradeoff.get("grid") or {}).values()}
    levels = range(min(sizes)) if sizes else range(0)
    return cfg.tradeoff.level in levels, f"an integer in [0, {len(levels)}) (the sweep's grid has {len(levels)} levels)"


def _precision_keeps_weights_exact(cfg: DictConfig) -> tuple[bool, str]:
    constrained = OmegaConf.select(cfg, "constraint.method", default="none") != "none"
    return not (constrained and cfg.trainer.precision in LOW_PRECISION_WEIGHTS), (
        f"one that keeps float32 weights while constraint.method={cfg.constraint.method} is enforced "
        f"(e.g. bf16-mixed): {cfg.trainer.precision} rounds every projected weight to 16 bits, which can push it past w_max"
    )


def data_options(kind: str) -> list[str]:
    """The ``data=`` options whose datamodule yields ``kind`` (read from conf/data/*.yaml)."""
    options = []
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / "data").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target and getattr(get_object(target), "kind", None) == kind:
            options.append(path.stem)
    return options


def _choice(cfg: DictConfig, group: str) -> str:
    """How the user named a group's option (``data=shakespeare``), or its target outside Hydra."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    return cfg[group]._target_.rsplit(".", 1)[-1]


def check_model_fits_data(cfg: DictConfig) -> None:
    needs = getattr(get_object(cfg.model._target_), "data_kind", None)
    gives = getattr(get_object(cfg.data._target_), "kind", None)
    if needs is not None and needs != gives:
        options = " or ".join(f"data={option}" for option in data_options(needs))
        raise ConfigError(f"{_choice(cfg, 'data')} gives {gives}, but {_choice(cfg, 'model')} trains on {needs}: use {options}")


def _sequences_fit_the_model(cfg: DictConfig) -> tuple[bool, str]:
    longest = max(cfg.data.get(key) or 0 for key in ("seq_len", "val_seq_len"))
    return longest <= cfg.model.net.seq_len, f"at least the longest data sequence ({longest} tokens)"


def _vocabulary_fits_the_model(cfg: DictConfig) -> tuple[bool, str]:
    return cfg.model.net.vocab_size >= cfg.data.vocab_size, f"at least data.vocab_size={cfg.data.vocab_size}"


def _flex_attention_trains_on_cuda(cfg: DictConfig) -> tuple[bool, str]:
    import torch

    accelerator = str(cfg.trainer.accelerator)
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return cfg.model.net.attention != "flex" or on_cuda, (
        f"auto, sdpa or explicit when training on {'a CPU' if not on_cuda else accelerator} (flex attention has no backward "
        f"there in torch {torch.__version__}; auto takes flex on CUDA and SDPA elsewhere)"
    )


# key -> (keys it reads, check); run once every key it reads is present and passed the checks above
RELATIONS: dict[str, tuple[tuple[str, ...], Callable[[DictConfig], tuple[bool, str]]]] = {
    "model.net.num_heads": (("model.net.width", "model.net.num_heads"), _heads_divide_width),
    "model.net.seq_len": (("model.net.seq_len", "data.seq_len"), _sequences_fit_the_model),
    "model.net.vocab_size": (("model.net.vocab_size", "data.vocab_size"), _vocabulary_fits_the_model),
    "trainer.precision": (("trainer.precision", "constraint.method"), _precision_keeps_weights_exact),
    "model.net.attention": (("model.net.attention", "trainer.accelerator"), _flex_attention_trains_on_cuda),
    "tradeoff.level": (("tradeoff.level",), _level_in_grid),
}


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first unknown setting, out-of-range value or mismatch."""
    if OmegaConf.select(cfg, "model._target_", default=None) and OmegaConf.select(cfg, "data._target_", default=None):
        check_model_fits_data(cfg)  # first: a model on the wrong data fails every later interpolation
    for section in TARGET_SECTIONS:
        _check_keys_accepted(cfg, section)
    for section in TARGET_SECTIONS:
        _check_section_values(cfg, section)
    for key, hint in TOP_LEVEL_SETTINGS.items():
        value = _value(cfg, key)
        if value is not _ABSENT:
            _check_value(key, value, hint)
    for key, hint in TRAINER_SETTINGS.items():
        value = _value(cfg, f"trainer.{key}")
        if value is not _ABSENT:
            _check_value(f"trainer.{key}", value, hint)
    for key, (reads, relation) in RELATIONS.items():
        if all(OmegaConf.select(cfg, read, default=_ABSENT) is not _ABSENT for read in reads):
            _raise_unless(key, *relation(cfg), value=OmegaConf.select(cfg, key))


def _raise_unless(key: str, ok: bool, description: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {description}, got {value!r}")
