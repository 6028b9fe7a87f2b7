"""What the entry points share before any work: ``resume=<run dir>``, the rank's run directory,
the config resolvers and known warnings, composing and checking a command's settings, the
console/file split of the log.

Kept free of torch and Lightning, so that ``--cfg job``, ``--help`` and a bad setting answer in a
second.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning import CONF_DIR, SWEEPS_DIR
from lipschitz_lightning.errors import ConfigError

# the files Hydra (re)writes into a run directory before the task starts
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# overrides a resumed run sets itself, never carried over from an earlier invocation
RESUME_KEYS = ("resume", "ckpt_path")


class BelowLevel(logging.Filter):
    """Passes records below ``level``: the stdout handler takes these, stderr the rest."""

    def __init__(self, level: str | int = logging.WARNING):
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class DropPrefixes(logging.Filter):
    """Drops records whose message starts with one of ``prefixes`` (Lightning's advertising tips)."""

    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@dataclass
class Resumed:
    """The run a ``resume=`` invocation continues, and its Hydra files as they were before it."""

    run_dir: Path
    checkpoint: Path
    saved: dict[Path, bytes] = field(default_factory=dict)

    def restore(self) -> None:
        """Put the run's saved config back: an attempt that failed before training must not replace
        the settings the next ``resume=`` re-reads."""
        for path, content in self.saved.items():
            path.write_bytes(content)


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _key(override: str) -> str:
    """``+data.x=1`` -> ``data.x``; ``optimizer@opt=adamw`` -> ``optimizer@opt``."""
    return override.split("=", 1)[0].lstrip("+~")


def _quoted(value: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters Hydra's grammar reads."""
    if re.fullmatch(r"[\w./~:+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_arguments(args: list[str]) -> tuple[list[str], Resumed | None]:
    """Rewrite ``resume=<run dir or checkpoint>`` into the run's own overrides, its checkpoint and its directory.

    The overrides the run was started with (``<run dir>/.hydra/overrides.yaml``) come first and the
    command line's after them, so a value given again on the command line wins. Without ``resume=``
    the arguments pass through unchanged.
    """
    values = [a.split("=", 1)[1] for a in args if _is_override(a) and _key(a) == "resume" and not a.startswith(("+", "~"))]
    if not values or values[-1] in ("", "null"):
        return args, None
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError("resume continues one run: it cannot be combined with --multirun")
    if any(_is_override(a) and _key(a) == "ckpt_path" for a in args):
        raise ConfigError("give resume or ckpt_path, not both: resume=<run dir> resumes from <run dir>/checkpoints/last.ckpt, resume=<checkpoint> from that file")
    target = Path(values[-1]).expanduser().resolve()
    if target.is_file():
        checkpoint, run_dir = target, target.parent.parent
    else:
        checkpoint, run_dir = target / "checkpoints" / "last.ckpt", target
    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "overrides.yaml").is_file():
        raise ConfigError(f"resume must be a run directory of train.py (one with .hydra/overrides.yaml) or a checkpoint in its checkpoints/, got {values[-1]!r}")
    if not checkpoint.is_file():
        raise ConfigError(f"resume: {run_dir} has no checkpoints/last.ckpt (the run stopped before its first validation): start it again instead")
    try:
        saved_overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))]
    except Exception as error:
        raise ConfigError(f"resume: cannot read {hydra_dir / 'overrides.yaml'} ({type(error).__name__}: {error})") from None

    given = [a for a in args if _is_override(a)]
    kept = [o for o in saved_overrides if _key(o) not in {_key(a) for a in given} and _key(o) not in RESUME_KEYS]
    rewritten = [
        *kept,
        *given,
        f"ckpt_path={_quoted(str(checkpoint))}",
        # a run of a sweep continues as a single run, in its own job directory
        "hydra.mode=RUN",
        f"hydra.run.dir={_quoted(str(run_dir))}",
        # Hydra's flags (--cfg job, ...) after every override: argparse takes no override between them
        *[a for a in args if not _is_override(a)],
    ]
    saved = {hydra_dir / name: (hydra_dir / name).read_bytes() for name in HYDRA_FILES if (hydra_dir / name).is_file()}
    return rewritten, Resumed(run_dir, checkpoint, saved)


# ----------------------------------------------------------------------------- entry-point settings


def launcher_rank() -> int:
    """This process's global rank under torchrun (``RANK``) or srun (``SLURM_PROCID``); 0 otherwise."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_arguments(args: list[str]) -> list[str]:
    """Only rank 0 writes a run directory. Lightning's own launcher already sends its processes to
    rank 0's directory (``hydra.job.name=train_ddp_process_<k>``); under torchrun or srun every
    process would otherwise make a directory of its own, so ranks 1.. run in a scratch directory
    that is removed when they exit (their messages still reach the console)."""
    rank = launcher_rank()
    if rank == 0 or any(a.startswith("hydra.job.name=train_ddp_process_") for a in args):
        return args
    scratch = tempfile.mkdtemp(prefix=f"lipschitz-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, True)
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={_quoted(scratch)}", "hydra.output_subdir=null"]


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
        if not (_is_override(arg) and _key(arg) == "hydra.searchpath"):
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


def set_cuda_allocator() -> None:
    """Expandable segments, as the paper's NanoGPT script sets them: fewer wasted reserved blocks when
    step and validation shapes alternate. The user's own setting wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


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


# Lightning's notices that say nothing to act on in this project's runs
KNOWN_WARNINGS = (
    r".*does not have many workers.*",  # the data already sits in memory as tensors; workers would only add start-up
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6's own pytree use under torch >= 2.10
    # ckpt_path=<checkpoint> starts a new run directory, so the old directory's best-k bookkeeping is
    # rightly left behind; resume=<run dir> continues in the old directory and finds it full, as it should
    r".*The dirpath has changed from.*",
    r".*Checkpoint directory .* exists and is not empty.*",
)


def quiet_known_warnings() -> None:
    """Hide ``KNOWN_WARNINGS``: for the entry points, never at import (the filters are process-wide)."""
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


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

    from lipschitz_lightning.commands.settings import (
        accepted_keys,
        holds_settings,
        owner,
    )

    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return _not_an_option(group, option, list(error.options))
    if isinstance(error, ValueError):  # Hydra's own, for a group given a number: model=5
        for override in overrides:
            group, value = _key(override), override.split("=", 1)[1]
            options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
            if options and value not in options:
                return _not_an_option(group, value, options)
    key = getattr(error.__cause__, "full_key", None) or _not_a_group(config_name, overrides)
    if key:
        section = key.rsplit(".", 1)[0] if "." in key else None
        rest = [o for o in overrides if _key(o) != key]
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


def command_main(name: str, argv: list[str] | None = None) -> None:
    """``python -m lipschitz_lightning.<name>`` for the commands configured by ``conf/<name>.yaml``
    (sample, evaluate, certify, quantize): the settings composed and checked (``settings.COMMAND_SETTINGS``)
    before torch is imported, then ``lipschitz_lightning.commands.<name>.run``."""
    import importlib

    from lipschitz_lightning.commands.settings import COMMAND_SETTINGS, command_settings
    from lipschitz_lightning.errors import exit_with

    args = sys.argv[1:] if argv is None else argv
    usage = "\n".join(line.lstrip("# ") for line in (CONF_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    try:
        cfg = compose_command(name, args, usage)
        if cfg is None:
            return
        command_settings(COMMAND_SETTINGS[name], cfg, f"python -m lipschitz_lightning.{name}")
    except ConfigError as error:
        exit_with(error)
    importlib.import_module(f"lipschitz_lightning.commands.{name}").run(cfg)
