"""What ``train.py`` does before and around Hydra: ``resume=<run dir>`` and the console/file split.

Kept free of torch and Lightning, so that ``--cfg job``, ``--help`` and Hydra's own errors answer
in a second.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lipschitz_lightning.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

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

    # conf/train.yaml puts <project root>/sweeps on Hydra's search path, so that `+sweep=...` works
    # from any working directory (a relative file:// path would not)
    OmegaConf.register_new_resolver("lipschitz_lightning.project_root", lambda: str(PROJECT_ROOT), replace=True)
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
