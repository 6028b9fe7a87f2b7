"""What the entry points share before any work: ``resume=<run dir>``, the rank's run directory,
the known warnings, a command's settings composed and checked (``config.compose``,
``config.settings``), the console/file split of the log.

Kept free of torch and Lightning, so that ``--cfg job``, ``--help`` and a bad setting answer in a
second.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lipschitz_lightning import CONF_DIR
from lipschitz_lightning.config.compose import compose_command, is_override, override_key, quoted
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


def resume_arguments(args: list[str]) -> tuple[list[str], Resumed | None]:
    """Rewrite ``resume=<run dir or checkpoint>`` into the run's own overrides, its checkpoint and its directory.

    The overrides the run was started with (``<run dir>/.hydra/overrides.yaml``) come first and the
    command line's after them, so a value given again on the command line wins. Without ``resume=``
    the arguments pass through unchanged.
    """
    values = [a.split("=", 1)[1] for a in args if is_override(a) and override_key(a) == "resume" and not a.startswith(("+", "~"))]
    if not values or values[-1] in ("", "null"):
        return args, None
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError("resume continues one run: it cannot be combined with --multirun")
    if any(is_override(a) and override_key(a) == "ckpt_path" for a in args):
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

    given = [a for a in args if is_override(a)]
    kept = [o for o in saved_overrides if override_key(o) not in {override_key(a) for a in given} and override_key(o) not in RESUME_KEYS]
    rewritten = [
        *kept,
        *given,
        f"ckpt_path={quoted(str(checkpoint))}",
        # a run of a sweep continues as a single run, in its own job directory
        "hydra.mode=RUN",
        f"hydra.run.dir={quoted(str(run_dir))}",
        # Hydra's flags (--cfg job, ...) after every override: argparse takes no override between them
        *[a for a in args if not is_override(a)],
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
    return [*kept, f"hydra.run.dir={quoted(scratch)}", "hydra.output_subdir=null"]


def set_cuda_allocator() -> None:
    """Expandable segments, as the paper's NanoGPT script sets them: fewer wasted reserved blocks when
    step and validation shapes alternate. The user's own setting wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


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


def command_main(name: str, argv: list[str] | None = None) -> None:
    """``python -m lipschitz_lightning.<name>`` for the commands configured by ``conf/<name>.yaml``
    (sample, evaluate, certify, quantize): the settings composed and checked into their typed object
    (``config.settings.COMMAND_SETTINGS``) before torch is imported, then
    ``lipschitz_lightning.commands.<name>.run`` with that object: the command reads what was checked."""
    import importlib

    from lipschitz_lightning.config.settings import COMMAND_SETTINGS, command_settings
    from lipschitz_lightning.errors import exit_with

    args = sys.argv[1:] if argv is None else argv
    usage = "\n".join(line.lstrip("# ") for line in (CONF_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    try:
        cfg = compose_command(name, args, usage)
        if cfg is None:
            return
        settings = command_settings(COMMAND_SETTINGS[name], cfg, f"python -m lipschitz_lightning.{name}")
    except ConfigError as error:
        exit_with(error)
    importlib.import_module(f"lipschitz_lightning.commands.{name}").run(settings)
