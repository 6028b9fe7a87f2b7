"""Every command's settings, checked before anything is built; each failure is one line naming the
key and what it allows.

The types have one source each, and pydantic checks every value against it (strictly: no string
for a number, no boolean for an integer, no inf or nan):

- a config group with a ``_target_`` (optimizer, scheduler, constraint, data, model, model.net):
  its target's signature (``core.types``' annotations; the GPT's fields are ``GPTConfig``). A key
  that is not a parameter of the target (``optimizer.momentum`` with AdamW) is refused naming the
  option and what it has;
- what has no target of this project: pydantic models here, ``TrainSettings`` (``conf/train.yaml``'s
  own keys), ``TrainerSettings`` (the Lightning trainer keys this project passes),
  ``SampleSettings``, ``EvaluateSettings``, ``CertifySettings`` (``conf/{sample,evaluate,certify}.yaml``;
  the yaml files hold the defaults, these the types);
- relations across keys, spelled out (``RELATIONS``): heads divide the width, the model fits the
  data, the trainer's precision keeps projected weights exact, the window pattern fits the blocks...

Hydra's own composition errors (an unknown option, a key no yaml file has) become the same one line
(``config.compose.check_composition``), before torch or Lightning is imported. The targets' signatures need
their modules, so their values are checked once those are imported (a few seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import annotated_types as at
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lipschitz_lightning import CONF_DIR
from lipschitz_lightning.config.tradeoff import constraint_name
from lipschitz_lightning.core.types import (
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Radius,
    describe,
)
from lipschitz_lightning.errors import ConfigError

_ABSENT = object()
PACKAGE = "lipschitz_lightning."
TARGET_SECTIONS = ("optimizer", "scheduler", "constraint", "loss", "data", "model", "model.net")
STRICT = ConfigDict(strict=True, allow_inf_nan=False)

# Lightning's precision settings. 16-bit "-true" settings store the weights in 16 bits, whose
# rounding after a projection can push a weight past w_max: refused with a constraint (below).
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", 64, 32, "64", "32")
LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true")
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


# ---------------------------------------------------------------------------- the one checker


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=STRICT)


def _tupled(value: Any, hint: Any) -> Any:
    """OmegaConf gives lists; a fixed-length tuple annotation (betas) means the same list."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _tupled(value, typing.get_args(hint)[0])
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def check(value: Any, hint: Any) -> tuple[bool, str]:
    """Whether ``value`` (plain Python, as OmegaConf gives it) fits the type ``hint``, by pydantic,
    and what the hint allows, in words (``core.types.describe``)."""
    try:
        _adapter(hint).validate_python(_tupled(value, hint))
    except ValidationError:
        return False, describe(hint)
    return True, describe(hint)


class Settings(BaseModel):
    """A command's settings: every key typed, any other key refused (subclasses inherit this config
    and change only what they name)."""

    model_config = ConfigDict(**STRICT, extra="forbid", populate_by_name=True)


def holds_settings(key: str, settings: list[str]) -> str:
    """The message for a group of settings given one value (``attack=3``)."""
    return f"{key} holds settings, not one value: give {key}.<setting>=<value>; its settings: {', '.join(settings)}"


def validate_settings(model: type[Settings], values: dict, command: str, prefix: str = "") -> Settings:
    """``values`` as ``model``, or one ``ConfigError`` line: ``<prefix><key> must be ..., got ...`` or
    ``<prefix><key> is not a setting of <command>; allowed: ...``."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        loc = _without_union_tags(model, first["loc"])
        key = prefix + ".".join(str(part) for part in loc)
        if first["type"] == "extra_forbidden":
            allowed = _fields(model, loc[:-1])
            raise ConfigError(f"{key} is not a setting of {command}; allowed: {', '.join(allowed)}") from None
        inner = _fields(model, loc)
        if inner:
            raise ConfigError(holds_settings(key, inner)) from None
        raise ConfigError(f"{key} must be {_describe_field(model, loc)}, got {first.get('input')!r}") from None


def _without_union_tags(model: type[BaseModel], loc: tuple) -> tuple:
    """pydantic's error location less the names it gives a union's branches (``ckpt_path.constrained-str``):
    field names and list indices only, so the key is the user's and its description the whole union's."""
    kept: list = []
    for part in loc:
        hint = _field_hint(model, tuple(kept))
        if isinstance(part, int) or (isinstance(hint, type) and issubclass(hint, BaseModel)):
            kept.append(part)
    return tuple(kept)


def _field_hint(model: type[BaseModel], loc: tuple) -> Any:
    hint: Any = model
    for part in loc:
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            field = hint.model_fields.get(str(part)) or next(f for f in hint.model_fields.values() if f.alias == part)
            hint = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        else:
            args = [a for a in typing.get_args(typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint) if a is not type(None)]
            hint = args[0] if args else Any
    return hint


def _describe_field(model: type[BaseModel], loc: tuple) -> str:
    try:
        return describe(_field_hint(model, loc))
    except (StopIteration, IndexError, TypeError):
        return "of another type"


def _fields(model: type[BaseModel], loc: tuple) -> list[str]:
    hint = _field_hint(model, loc) if loc else model
    return [field.alias or name for name, field in hint.model_fields.items()] if isinstance(hint, type) and issubclass(hint, BaseModel) else []


# ---------------------------------------------------------------------------- what has no target


class TrainerSettings(Settings):
    """The Lightning trainer keys this project's configs set; any other Trainer argument
    (``+trainer.gradient_clip_val=...``) passes to Lightning, which checks it."""

    model_config = ConfigDict(extra="allow")
    target: Literal["lightning.pytorch.Trainer"] = Field(alias="_target_")
    default_root_dir: str | None = None
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: Annotated[int, at.Ge(-1)] | Literal["auto"] | list[NonNegativeInt] = "auto"
    strategy: str | dict[str, Any] = "auto"  # a name, or this project's {_target_: ...ShardedStepDDP}
    num_nodes: PositiveInt = 1
    use_distributed_sampler: bool = False
    precision: Literal[PRECISIONS] = "32-true"
    max_steps: PositiveInt = 1
    val_check_interval: PositiveInt = 1  # steps between validations: epochs play no role
    check_val_every_n_epoch: PositiveInt | None = None
    num_sanity_val_steps: NonNegativeInt = 0
    log_every_n_steps: PositiveInt = 1
    accumulate_grad_batches: PositiveInt = 1
    deterministic: bool = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    limit_val_batches: NonNegativeInt | Annotated[float, at.Interval(ge=0, le=1)] | None = None


# what a run can return to a sweeper (summary.json's keys; lipschitz/log10_bound is written for it)
OBJECTIVES = ("val/acc", "val/loss", "val/certified_acc", "lipschitz/bound", "lipschitz/log10_bound")


class TrainSettings(Settings):
    """``conf/train.yaml``'s own keys; the groups are checked by their targets and their own models."""

    task_name: str
    tags: list[str]
    seed: int
    keep_freed_memory: bool
    flush_subnormals: bool = True
    ckpt_path: str | None = None
    resume: str | None = None
    data: dict
    optimizer: dict
    scheduler: dict
    constraint: dict
    loss: dict | None = None
    trainer: dict
    callbacks: dict | None = None
    model: dict
    logger: dict | None = None
    paths: dict
    tradeoff: dict | None = None  # a sweep's level and grid (sweeps/)
    search: dict | None = None  # an Optuna search's own settings (sweeps/hparams_search/)
    # what the run returns to a Hydra sweeper, in order (a search's objectives: sweeps/hparams_search/)
    optimized_metrics: Annotated[list[Literal[OBJECTIVES]], at.MinLen(1)] | None = None


class DataPaths(Settings):
    data_dir: str | None = None
    cache_dir: str | None = None


class SampleSettings(Settings):
    ckpt_path: str
    prompt: Annotated[str, at.MinLen(1)]
    num_tokens: NonNegativeInt
    temperature: NonNegative  # 0: greedy
    seed: int
    device: Literal[DEVICES]


class EvaluateSettings(Settings):
    ckpt_path: str
    paths: DataPaths
    data: dict[str, Any]  # the run's data settings to change (null: the run's own)
    device: Literal[DEVICES]


class Attack(Settings):
    steps: PositiveInt
    restarts: PositiveInt
    step_size: Positive
    batch: PositiveInt


class LowerBound(Settings):
    points: PositiveInt
    pairs: PositiveInt
    steps: PositiveInt
    lr: Positive
    gap: Positive


class AutoAttackSettings(Settings):
    examples: NonNegativeInt
    version: Literal["standard", "plus", "rand"]


class CertifySettings(Settings):
    ckpt_path: Annotated[str, at.MinLen(1)] | Annotated[list[Annotated[str, at.MinLen(1)]], at.MinLen(1)]
    out_dir: str | None
    paths: DataPaths
    data: dict[str, Any]
    seed: int
    examples: PositiveInt | None  # null: the whole validation split
    radii: Annotated[list[Positive], at.MinLen(1)]  # l2, pixels in [0, 1]
    attack: Attack
    autoattack: AutoAttackSettings
    lower_bound: LowerBound
    curve_max_radius: Positive
    max_batches: PositiveInt
    stats_tokens: PositiveInt
    lm_radius: Radius | None  # token RMS; null: the run's margin-loss radius, if it trained with one


def _resolvable(node) -> dict:
    """A config node's keys whose values resolve now (outside Hydra's app, ``${hydra:...}`` does not):
    the others are checked inside the app, by ``validate_config``."""
    values = {}
    for key in node:
        if key == "hydra":  # Hydra's own node, when the config was composed for a run
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation only the running app resolves
            continue
        values[str(key)] = OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    return values


def check_train_settings(cfg: DictConfig) -> None:
    """``conf/train.yaml``'s own keys and the trainer's, before torch is imported."""
    validate_settings(TrainSettings, _resolvable(cfg), "train.py")
    trainer = validate_settings(TrainerSettings, _resolvable(cfg.trainer), "the trainer", prefix="trainer.")
    if trainer.model_extra:  # +trainer.<key>: Lightning's to check, and only then worth importing it
        from lightning.pytorch import Trainer

        arguments = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
        hints = typing.get_type_hints(Trainer.__init__)
        for key, value in trainer.model_extra.items():
            if key not in arguments:
                raise ConfigError(f"trainer.{key} is not an argument of Lightning's Trainer; allowed: {', '.join(arguments)}")
            try:
                ok, allowed = check(value, hints[key])
            except Exception:  # a type pydantic cannot read (a Logger, a Profiler): Lightning checks it
                continue
            _raise_unless(f"trainer.{key}", ok, allowed, value)


def check_wandb_can_log(cfg: DictConfig) -> None:
    """``logger=wandb`` online needs a W&B key, or wandb.init prompts (a terminal) or fails (a job), once
    the run directory and the model exist. Where W&B finds a key (``WANDB_API_KEY``, an identity token
    file, the netrc entry ``wandb login`` writes) or will not go online (``WANDB_MODE``,
    ``logger.wandb.offline``, ``wandb offline``'s settings file), this says nothing."""
    import configparser
    import netrc
    import os
    from pathlib import Path
    from urllib.parse import urlparse

    wandb = [item for item in (cfg.get("logger") or {}).values()
             if item is not None and str(item.get("_target_", "")).endswith("WandbLogger")]
    if not wandb or any(item.get("offline") for item in wandb):
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    for settings_file in (Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser() / "settings",
                          Path("wandb") / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings_file)
        except configparser.Error:
            continue
        if parser.get("default", "mode", fallback="").lower() in ("offline", "dryrun", "disabled"):
            return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    netrc_file = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        if netrc_file.is_file() and netrc.netrc(netrc_file).authenticators(host):
            return
    except (netrc.NetrcParseError, OSError):
        pass
    raise ConfigError(
        f"logger=wandb has no W&B key for {host}: run `wandb login` once, or set WANDB_API_KEY, "
        "or log locally with WANDB_MODE=offline (`wandb sync` uploads later)"
    )


class QuantizeSettings(Settings):
    ckpt_path: Annotated[str, at.MinLen(1)] | Annotated[list[Annotated[str, at.MinLen(1)]], at.MinLen(1)]
    out_dir: str | None
    paths: DataPaths
    data: dict[str, Any]
    # robustness.quantize.SCHEME_NAMES
    schemes: Annotated[list[Literal["int8", "fp8", "int4", "fp8_act"]], at.MinLen(1)]
    int4_group: PositiveInt
    examples: PositiveInt | None  # null: the whole validation split
    batch: PositiveInt
    max_batches: PositiveInt


COMMAND_SETTINGS: dict[str, type[Settings]] = {"sample": SampleSettings, "evaluate": EvaluateSettings, "certify": CertifySettings,
                                               "quantize": QuantizeSettings}


def command_settings(model: type[Settings], cfg: DictConfig, command: str) -> Settings:
    """A command's composed config (``hydra`` aside) as ``model``; a missing required value (``???``) is
    one line too."""
    for key in model.model_fields:
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} must be given: {command} {key}=...")
    values = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return validate_settings(model, values, command)


# ---------------------------------------------------------------------------- targets


def target_settings(target: str) -> dict[str, Any] | None:
    """Parameter name -> type hint of a ``_target_`` of this package, or of a user's class built on
    one of this package's (a constraint of their own, docs/constraints.md: its inherited ``w_max`` is
    checked as ours is); None for other libraries'.

    A target that takes ``**config`` names its schema in ``config_schema`` (a dataclass)."""
    obj = get_object(target)
    ours = target.startswith(PACKAGE) or (inspect.isclass(obj) and any(
        base.__module__.startswith(PACKAGE) for base in obj.__mro__[1:]))
    if not ours:
        return None
    schema = getattr(obj, "config_schema", None)
    if schema is not None:
        return typing.get_type_hints(schema, include_extras=True)
    function = obj.__init__ if inspect.isclass(obj) else obj
    hints = typing.get_type_hints(function, include_extras=True)
    return {name: hints.get(name, Any) for name in inspect.signature(function).parameters if name not in ("self", "params")}


def import_target(section: str, target: str) -> Any:
    """``<section>._target_``'s object, imported as ``instantiate`` will import it; one ``ConfigError``
    line when it cannot be: a module of the user's own goes where ``config.compose.user_code_on_path`` looks."""
    from hydra._internal.utils import _locate  # hydra.utils.get_object, without its multi-line log

    try:
        return _locate(str(target))
    except (ImportError, ValueError) as error:
        cause = error.__cause__ or error
        missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
        if missing and str(target).startswith(missing + "."):  # the target's own module, not one it imports
            raise ConfigError(
                f"{section}._target_ {target} cannot be imported: no module {missing} in the working folder, in a "
                f"hydra.searchpath=[file://<folder>] folder or installed: put {missing.replace('.', '/')}.py in one of "
                f"those folders, or install it"
            ) from None
        message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        raise ConfigError(f"{section}._target_ {target} cannot be imported: {type(cause).__name__}: {message}") from None


def accepted_keys(node) -> list[str] | None:
    """The settings a ``_target_`` section may hold: its target's parameters (None when any is
    accepted, a ``**kwargs`` target of another library)."""
    obj = get_object(node["_target_"])
    schema = getattr(obj, "config_schema", None)
    if schema is not None:
        return [field.name for field in dataclasses.fields(schema)]
    try:
        parameters = inspect.signature(obj).parameters
    except (ValueError, TypeError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return [name for name in parameters if name not in ("self", "params", "optimizer")]


def owner(cfg, section: str) -> str:
    """How the user chose what ``section`` holds: ``optimizer=adamw``, ``model=gpt`` (for ``model.net``
    too), or the target's name outside Hydra."""
    group = section.split(".")[0]
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    choice = (choices or {}).get(group)
    if choice:
        return f"{group}={choice}" + (f" ({section})" if section != group else "")
    return str(OmegaConf.select(cfg, f"{section}._target_", default=section)).rsplit(".", 1)[-1]


def _check_keys_accepted(cfg: DictConfig, section: str) -> None:
    """Every key of a ``_target_`` section must be a parameter of its target, caught here rather
    than as a TypeError after the data has loaded (``optimizer.momentum`` left over after switching
    to AdamW, with or without Hydra's ``+``)."""
    node = OmegaConf.select(cfg, section, default=None)
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return
    import_target(section, node._target_)  # a user's module that is not found: one line, not Hydra's
    allowed = accepted_keys(node)
    if allowed is None:
        return
    for key in node:
        if not str(key).startswith("_") and key not in allowed and key not in ("net",):
            raise ConfigError(f"{section}.{key} is not a setting of {owner(cfg, section)}; allowed: {', '.join(allowed)}")


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


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
        value = _value(cfg, f"{section}.{key}")
        _raise_unless(f"{section}.{key}", *check(value, settings[key]), value=value)


# ---------------------------------------------------------------------------- relations across keys


def _heads_divide_width(cfg: DictConfig) -> tuple[bool, str]:
    width, heads = cfg.model.net.width, cfg.model.net.num_heads
    return width % heads == 0 and (width // heads) % 2 == 0, f"a divisor of model.net.width={width} leaving an even head size (RoPE)"


def _window_pattern_fits_the_blocks(cfg: DictConfig) -> tuple[bool, str]:
    pattern, blocks = cfg.model.net.window_pattern, cfg.model.net.num_blocks
    example = ("L" + "S" * (blocks - 2) + "L")[:blocks]
    ok = pattern is None or (isinstance(pattern, str) and len(pattern) == blocks and not set(pattern) - {"L", "S"})
    return ok, (f"one letter per block, L (long window) or S (short), for model.net.num_blocks={blocks} (e.g. {example}), "
                f"or null for no window")


def _window_in_whole_blocks(cfg: DictConfig) -> tuple[bool, str]:
    net = cfg.model.net
    ok = net.window_pattern is None or (net.window_min % 128 == 0 and net.window_max % 128 == 0 and net.window_min <= net.window_max)
    return ok, f"a multiple of 128 tokens at least model.net.window_min={net.window_min} (the window counts whole blocks of 128)"


def _maxmin_pairs_the_features(cfg: DictConfig) -> tuple[bool, str]:
    width = cfg.model.net.width
    return cfg.model.net.activation != "maxmin" or width % 2 == 0, f"relu with model.net.width={width} (maxmin sorts pairs of features: an even width)"


def _patches_tile_the_image(cfg: DictConfig) -> tuple[bool, str]:
    size = cfg.model.net.image_size
    return size % cfg.model.net.patch_size == 0, f"a divisor of model.net.image_size={size}"


def _level_in_grid(cfg: DictConfig) -> tuple[bool, str]:
    sizes = {len(values) for values in (cfg.tradeoff.get("grid") or {}).values()}
    levels = range(min(sizes)) if sizes else range(0)
    return cfg.tradeoff.level in levels, f"an integer in [0, {len(levels)}) (the sweep's grid has {len(levels)} levels)"


def _precision_keeps_weights_exact(cfg: DictConfig) -> tuple[bool, str]:
    name = constraint_name(OmegaConf.to_container(cfg.constraint)) if cfg.get("constraint") is not None else "none"
    return not (name != "none" and cfg.trainer.precision in LOW_PRECISION_WEIGHTS), (
        f"one that keeps float32 weights while constraint={name} is enforced "
        f"(e.g. bf16-mixed): {cfg.trainer.precision} rounds every projected weight to 16 bits, which can push it past w_max"
    )


def data_options(kind: str) -> list[str]:
    """The ``data=`` options whose datamodule yields ``kind`` (read from conf/data/*.yaml)."""
    options = []
    for path in sorted((CONF_DIR / "data").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target and getattr(get_object(target), "kind", None) == kind:
            options.append(path.stem)
    return options


def check_model_fits_data(cfg: DictConfig) -> None:
    needs = getattr(import_target("model", cfg.model._target_), "data_kind", None)
    gives = getattr(import_target("data", cfg.data._target_), "kind", None)
    if needs is not None and needs != gives:
        options = " or ".join(f"data={option}" for option in data_options(needs))
        raise ConfigError(f"{owner(cfg, 'data')} gives {gives}, but {owner(cfg, 'model')} trains on {needs}: use {options}")


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
    "trainer.precision": (("trainer.precision", "constraint"), _precision_keeps_weights_exact),
    "model.net.attention": (("model.net.attention", "trainer.accelerator"), _flex_attention_trains_on_cuda),
    "model.net.window_pattern": (("model.net.window_pattern", "model.net.num_blocks"), _window_pattern_fits_the_blocks),
    "model.net.window_max": (("model.net.window_pattern", "model.net.window_min", "model.net.window_max"), _window_in_whole_blocks),
    "tradeoff.level": (("tradeoff.level",), _level_in_grid),
    "model.net.activation": (("model.net.activation", "model.net.width"), _maxmin_pairs_the_features),
    "model.net.patch_size": (("model.net.patch_size", "model.net.image_size"), _patches_tile_the_image),
}


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first unknown setting, out-of-range value or mismatch."""
    if OmegaConf.select(cfg, "model._target_", default=None) and OmegaConf.select(cfg, "data._target_", default=None):
        check_model_fits_data(cfg)  # first: a model on the wrong data fails every later interpolation
    if "task_name" in cfg:
        check_train_settings(cfg)
        check_wandb_can_log(cfg)
    for section in TARGET_SECTIONS:
        _check_keys_accepted(cfg, section)
    for section in TARGET_SECTIONS:
        _check_section_values(cfg, section)
    for key, (reads, relation) in RELATIONS.items():
        if all(OmegaConf.select(cfg, read, default=_ABSENT) is not _ABSENT for read in reads):
            _raise_unless(key, *relation(cfg), value=OmegaConf.select(cfg, key))


def _raise_unless(key: str, ok: bool, description: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {description}, got {value!r}")
