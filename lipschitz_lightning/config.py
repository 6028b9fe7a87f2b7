"""Range checks on the composed config, run before anything is built.

Hydra already rejects unknown groups, options and keys; these checks catch values that are
well-typed but meaningless, and name the key and what it allows in one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.constraints import COUPLINGS, LINEAR_METHODS, NS_COEFFICIENTS
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.models.gpt import ATTENTION_KERNELS, LAYERNORM_SUBSTITUTES
from lipschitz_lightning.optim.adamw import VARIANTS

_ABSENT = object()


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _unit_interval(v: Any) -> bool:
    return _non_negative(v) and v < 1


def _one_of(options) -> Callable[[Any], bool]:
    return lambda v: v in options


# key -> (predicate, what is allowed); a key missing from the config is not checked
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "constraint.method": (_one_of(LINEAR_METHODS), f"one of {sorted(LINEAR_METHODS)}"),
    "constraint.w_max": (_positive, "a number > 0"),
    "constraint.head_w_max": (lambda v: v is None or _positive(v), "null (same as w_max) or a number > 0"),
    "constraint.embed_w_max": (_positive, "a number > 0"),
    "constraint.coupling": (_one_of(COUPLINGS), f"one of {list(COUPLINGS)}"),
    "constraint.spectral_wd": (_unit_interval, "a number in [0, 1)"),
    "constraint.power_iters": (_positive_int, "an integer >= 1"),
    "optimizer.lr": (_positive, "a number > 0"),
    "optimizer.weight_decay": (_non_negative, "a number >= 0"),
    "optimizer.momentum": (_unit_interval, "a number in [0, 1)"),
    "optimizer.betas": (lambda v: len(v) == 2 and all(_unit_interval(b) for b in v), "two numbers in [0, 1)"),
    "optimizer.eps": (_positive, "a number > 0"),
    "optimizer.variant": (_one_of(VARIANTS), f"one of {list(VARIANTS)}"),
    "optimizer.ns_coefficients": (_one_of(NS_COEFFICIENTS), f"one of {sorted(NS_COEFFICIENTS)}"),
    "optimizer.embed_inflation": (_positive, "a number > 0"),
    "trainer.max_steps": (_positive_int, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (_positive_int, "an integer >= 1"),
    "trainer.val_check_interval": (_positive_int, "an integer >= 1 (steps between validations)"),
    "data.batch_size": (_positive_int, "an integer >= 1"),
    "data.val_batch_size": (_positive_int, "an integer >= 1"),
    "model.net.width": (_positive_int, "an integer >= 1"),
    "model.net.num_layers": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "model.net.num_heads": (_positive_int, "an integer >= 1"),
    "model.net.num_blocks": (_positive_int, "an integer >= 1"),
    "model.net.blocks_mass": (_positive, "a number > 0"),
    "model.net.layernorm_substitute": (_one_of(LAYERNORM_SUBSTITUTES), f"one of {list(LAYERNORM_SUBSTITUTES)}"),
    "model.net.attention": (_one_of(ATTENTION_KERNELS), f"one of {sorted(ATTENTION_KERNELS)}"),
    "data.seq_len": (_positive_int, "an integer >= 1"),
}


def _divides_width(cfg: DictConfig) -> tuple[bool, str]:
    width, heads = cfg.model.net.width, cfg.model.net.num_heads
    return width % heads == 0 and (width // heads) % 2 == 0, f"a divisor of model.net.width={width} leaving an even head size (RoPE)"


def _level_in_grid(cfg: DictConfig) -> tuple[bool, str]:
    sizes = {len(values) for values in (cfg.tradeoff.get("grid") or {}).values()}
    levels = range(min(sizes)) if sizes else range(0)
    return cfg.tradeoff.level in levels, f"an integer in [0, {len(levels)}) (the sweep's grid has {len(levels)} levels)"


# checks across keys: key -> a function of the whole config giving (ok, what is allowed); run once
# every key they read passed CHECKS
RELATIONS: dict[str, Callable[[DictConfig], tuple[bool, str]]] = {
    "model.net.num_heads": _divides_width,
    "tradeoff.level": _level_in_grid,
}


def _check_keys_accepted(cfg: DictConfig, section: str) -> None:
    """Every key of a ``_target_`` section must be a parameter of its target (say, ``momentum``
    left over for AdamW after switching optimizer), caught here rather than as a TypeError later."""
    node = OmegaConf.select(cfg, section, default=None)
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return
    try:
        parameters = inspect.signature(get_object(node._target_)).parameters
    except (ImportError, ValueError, TypeError):
        return  # hydra reports an unknown target itself
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for key in node:
        if not str(key).startswith("_") and key not in parameters:
            allowed = [name for name in parameters if name not in ("self", "params", "optimizer")]
            raise ConfigError(f"{section}.{key} is not a setting of {node._target_}; allowed: {', '.join(allowed)}")


TARGET_SECTIONS = ("optimizer", "scheduler", "constraint", "data", "model", "model.net")


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first unknown setting or out-of-range value."""
    for section in TARGET_SECTIONS:
        _check_keys_accepted(cfg, section)
    for key, (allowed, description) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            ok = allowed(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be {description}, got {value!r}")
    for key, relation in RELATIONS.items():
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            continue
        ok, description = relation(cfg)
        if not ok:
            raise ConfigError(f"{key} must be {description}, got {OmegaConf.select(cfg, key)!r}")
