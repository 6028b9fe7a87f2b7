"""Composing a config as Hydra will, and reading its errors: what every entry point does before any
work (the train command, the commands configured by ``conf/<command>.yaml``, the search, the
benchmark, the tests). An unknown option or key is one ``ConfigError`` line naming it.

Kept free of torch and Lightning, so that ``--cfg job``, ``--help`` and a bad setting answer in a
second.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning import CONF_DIR, SWEEPS_DIR
from lipschitz_lightning.errors import ConfigError


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def override_key(override: str) -> str:
    """``+data.x=1`` -> ``data.x``; ``optimizer@opt=adamw`` -> ``optimizer@opt``."""
    return override.split("=", 1)[0].lstrip("+~")


def quoted(value: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters Hydra's grammar reads."""
    if re.fullmatch(r"[\w./~:+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def user_code_on_path(args: list[str]) -> list[str]:
    """Make a ``_target_`` of the user's own importable (docs/constraints.md, "Adding a constraint"):
    the working folder goes on ``sys.path``, as ``python -m`` puts it there (``python train.py`` puts
    the script's folder instead, a console script neither), and so does every ``file://`` folder of
    the command line's ``hydra.searchpath``, so that ``my_conf/my_constraints.py`` is found beside
    ``my_conf/constraint/*.yaml``. Appended: a user's module never shadows an installed one. Returns
    the folders added; call it once, before a target is imported."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folders = [Path.cwd()]
    for arg in args:
        if not (is_override(arg) and override_key(arg) == "hydra.searchpath"):
            continue
        try:
            entries = OverridesParser.create().parse_override(arg).value()
        except Exception:  # an override Hydra cannot parse: its composition says so, in one line
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str) and entry.startswith("file://"):
                folders.append(Path.cwd() / Path(entry[len("file://"):]).expanduser())  # relative: to the working folder, as Hydra reads it
    added = [str(folder.resolve()) for folder in folders if folder.is_dir()]
    added = [folder for i, folder in enumerate(added) if folder not in sys.path and folder not in added[:i]]
    sys.path.extend(added)
    return added


def register_resolvers() -> None:
    """The resolvers ``conf/`` uses, for whoever composes it (the entry points, the tests): OmegaConf's
    registry is process-wide, so the library does not do it on import."""

    def if_cuda(on_gpu, otherwise):
        import torch

        return on_gpu if torch.cuda.is_available() else otherwise

    # conf/train.yaml puts sweeps/ (SWEEPS_DIR: the checkout's, or the installed package's) on Hydra's
    # search path, so that `+sweep=...` works from any working directory (a relative file:// path would not)
    OmegaConf.register_new_resolver("lipschitz_lightning.sweeps_dir", lambda: str(SWEEPS_DIR), replace=True)
    # the largest of some numbers: a setting that must cover two others (the model's longest sequence)
    OmegaConf.register_new_resolver("lipschitz_lightning.max", lambda *values: max(values), replace=True)
    # a setting that differs on a GPU (bfloat16 autocast, bfloat16 Newton-Schulz) and on a CPU
    OmegaConf.register_new_resolver("lipschitz_lightning.if_cuda", if_cuda, replace=True)


@contextlib.contextmanager
def hydra_set_aside():
    """Hydra's compose API needs GlobalHydra uninitialised; inside Hydra's app (a sweeper composing
    its trials' configs to check them) it is the app's: set it aside meanwhile, and back after."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def compose_checked(config_name: str, overrides: list[str], job_name: str | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as Hydra composes it; an unknown option
    or key, or a group given a number, is one ``ConfigError`` line (``composition_error``). With a
    ``job_name``, with Hydra's own node too, ready for ``hydra.core.utils.run_job``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name or "app"):
            return compose(config_name, overrides=overrides, return_hydra_config=job_name is not None)
    except (HydraException, ValueError) as error:  # ValueError: Hydra's own, for model=5
        raise ConfigError(composition_error(config_name, overrides, error)) from None


def check_composition(config_name: str, args: list[str], job_name: str | None = None) -> DictConfig | None:
    """Compose ``conf/<config_name>.yaml`` with the command line's overrides as Hydra will, so that an
    unknown option or key is one ``ConfigError`` line now, before torch is imported, rather than
    Hydra's message later; returns the composed config. Hydra's flags (``--cfg``, ``--help``, ``-m``)
    leave it all to Hydra (None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.startswith("-") for a in args):
        return None
    overrides = list(args)  # deletions (~key) too: this composition is the run's
    bare = [a for a in overrides if "=" not in a and not a.startswith("~")]
    if bare:
        raise ConfigError(f"{bare[0]!r} is not a setting: give key=value (see --help)")
    try:
        # a sweep's overrides (a=1,2 under +sweep=...) make a multirun: each job is composed by Hydra
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)):
            return None
    except HydraException as error:
        raise ConfigError(composition_error(config_name, overrides, error)) from None
    return compose_checked(config_name, overrides, job_name)


def composition_error(config_name: str, overrides: list[str], error: Exception) -> str:
    """Hydra's composition error as one line, from the structured exception Hydra raises: a missing
    option (``MissingConfigException``: the group and its options), a key no config has (the
    ``ConfigCompositionException``'s cause: an OmegaConf error with the ``full_key``), a group given
    a value that is no option (Hydra's ``ValueError``, for ``model=5``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from lipschitz_lightning.config.settings import (
        accepted_keys,
        holds_settings,
        owner,
    )

    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return _not_an_option(group, option, list(error.options))
    if isinstance(error, ValueError):  # Hydra's own, for a group given a number: model=5
        for override in overrides:
            group, value = override_key(override), override.split("=", 1)[1]
            options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
            if options and value not in options:
                return _not_an_option(group, value, options)
    key = getattr(error.__cause__, "full_key", None) or _not_a_group(config_name, overrides)
    if key:
        section = key.rsplit(".", 1)[0] if "." in key else None
        rest = [o for o in overrides if override_key(o) != key]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=rest, return_hydra_config=True)
        if section is None:
            if OmegaConf.is_dict(cfg.get(key)):
                return holds_settings(key, [str(k) for k in cfg[key] if not str(k).startswith("_")])
            allowed = [str(k) for k in cfg if k != "hydra"]
            return f"{key} is not a setting of {config_name}; allowed: {', '.join(allowed)}"
        node = OmegaConf.select(cfg, section, default=None)
        if OmegaConf.is_dict(node):
            allowed = (accepted_keys(node) if "_target_" in node else None) or [k for k in node if not str(k).startswith("_")]
            return f"{key} is not a setting of {owner(cfg, section)}; allowed: {', '.join(map(str, allowed))}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(("\tprovider", "Config search path")))


def _not_a_group(config_name: str, overrides: list[str]) -> str | None:
    """The override that names a config group which ``config_name``'s defaults list does not have
    (``data=x`` of evaluate, where data is a section): Hydra refuses it while reading the defaults
    list, with no key attached."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            groups = compose(config_name, return_hydra_config=True).hydra.runtime.choices
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an override Hydra cannot parse, or a config that does not compose: Hydra's message stands
        return None
    for override in parsed:
        key = override.key_or_group
        is_group_somewhere = any((folder / key).is_dir() for folder in (CONF_DIR, SWEEPS_DIR))
        if not (override.is_add() or override.is_delete() or override.is_force_add()) and is_group_somewhere and key not in groups:
            return key
    return None


def _not_an_option(group: str, option: str, options: list[str]) -> str:
    return f"{group}={option} is not an option of {group}; allowed: {', '.join(options)}"


def compose_command(config_name: str, args: list[str], usage: str) -> DictConfig | None:
    """A command's settings: ``conf/<config_name>.yaml`` with the ``key=value`` arguments, composed as
    Hydra composes them (these commands want no run directory and no log, so no Hydra app). An
    unknown key or option is one ``ConfigError`` line. ``--cfg job`` prints the composed settings and
    ``--help`` the usage; both return None."""
    if "--help" in args or "-h" in args:
        print(usage.strip())
        return None
    flags = [a for a in args if a.startswith("-") and a not in ("--cfg", "job")]
    if flags:
        raise ConfigError(f"{flags[0]} is not an option of this command: give key=value settings (see --help)")
    overrides = [a for a in args if a not in ("--cfg", "job")]
    bare = [a for a in overrides if "=" not in a]
    if bare:
        raise ConfigError(f"{bare[0]!r} is not a setting: give key=value (see --help)")
    cfg = compose_checked(config_name, overrides)
    if "--cfg" in args:
        print(OmegaConf.to_yaml(cfg, resolve=False))
        return None
    return cfg
