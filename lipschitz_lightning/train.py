"""Train a network whose Lipschitz constant is enforced throughout training: the command behind the
root ``train.py``, ``python -m lipschitz_lightning.train`` and the ``lipschitz-train`` console script
(the same Hydra app over ``conf/train.yaml``, found through ``CONF_DIR``, so it runs from an installed
package as from a checkout).

    python train.py                                   # MLP on CIFAR-10, Muon + spectral soft cap
    python train.py optimizer=adamw constraint=none   # the unconstrained baseline
    python train.py experiment=cifar_mlp_adamw_baseline
    python train.py resume=logs/train/runs/<run>      # continue a run with its own settings
    python train.py +sweep=cifar_tradeoff             # a tradeoff grid (Hydra multirun), see sweeps/
    python train.py +hparams_search=muon_spectral_soft_cap   # an Optuna search (a Hydra sweeper), see sweeps/

One execution path, as the Lightning-Hydra template has: Hydra's ``@hydra.main`` app runs ``job`` for
a single run, for every job of a grid and for every trial of a search.
"""

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning import CONF_DIR
from lipschitz_lightning.commands import search
from lipschitz_lightning.commands.cli import (
    HYDRA_FILES,
    quiet_known_warnings,
    rank_arguments,
    resume_arguments,
    set_cuda_allocator,
)
from lipschitz_lightning.config.compose import check_composition, register_resolvers, user_code_on_path
from lipschitz_lightning.config.settings import validate_config
from lipschitz_lightning.errors import (
    ConfigError,
    LipschitzLightningError,
    Preempted,
    exit_with,
    one_line,
)

log = logging.getLogger("lipschitz_lightning")


def run(args: list[str]) -> None:
    """The train command's line. A single run's config is composed and checked before Hydra's app
    makes its run directory (an unknown option or key, a value out of range: one line, nothing
    written); a grid's jobs and a search's trials are checked inside the app, each (a search checks
    its whole space first: commands/search.py). Then Hydra's app runs ``job``."""
    set_cuda_allocator()  # before torch is imported
    register_resolvers()
    user_code_on_path(args)  # a _target_ of the user's own: from the working folder or a hydra.searchpath folder
    try:
        args, resumed = resume_arguments(args)
        args = rank_arguments(args)
        composed = check_composition("train", args, job_name=job_name(args))
        single = composed is not None and composed.hydra.mode != RunMode.MULTIRUN
        if single and composed.get("search") is not None:
            search.search_settings(composed)  # a search's parts without a pair's: the one line that says so
        if single:
            validate_config(composed)  # every setting, before the run directory exists
    except ConfigError as error:
        exit_with(error)

    def job(cfg: DictConfig) -> float | None:
        # torch and Lightning load here, not at import: --cfg job, --help and Hydra's errors stay
        # quick, and Lightning's notices find Hydra's logging already set up (so they reach train.log)
        from lipschitz_lightning.commands.allocator import flush_subnormals, keep_freed_memory
        from lipschitz_lightning.commands.train import (
            build,
            in_multirun,
            record_failure,
            train,
        )

        # the lightning package gives itself a stderr console on import; Hydra's handlers show its notices already
        logging.getLogger("lightning").handlers.clear()
        logging.captureWarnings(True)  # warnings reach train.log too
        quiet_known_warnings()
        built = None
        try:
            OmegaConf.resolve(cfg)  # once, now that the run's directory is known (${hydra:...})
            if cfg.get("keep_freed_memory"):
                keep_freed_memory()
            if cfg.get("flush_subnormals"):
                flush_subnormals()
            built = build(cfg, checked=single)  # resume and data checks: nothing trained yet
            summary = train(cfg, built)
            if cfg.get("optimized_metrics"):  # a sweeper's objectives (a search's), in its order
                return tuple(summary.get(key) for key in cfg.optimized_metrics)  # a missing one: a failed trial
            return summary.get("val/acc")
        except Exception as error:
            if in_multirun():
                if built is None:
                    record_failure(cfg, error)  # train() records the failures of a built run itself
                # one diverged or misconfigured grid point is a result, not a reason to stop the sweep:
                # its summary.json says failed and the report lists it
                if isinstance(error, LipschitzLightningError) and not isinstance(error, Preempted):
                    return None
                if isinstance(error, Preempted):
                    # a SIGTERM stops the whole sweep: an exception would only fail this job (Hydra's
                    # launcher runs the rest and raises at the end), SystemExit ends the process now
                    # (a search tells its running trial FAIL on the way out)
                    log.error(one_line(error))
                    sys.exit(error.exit_status)
                raise
            if built is None:
                if resumed is not None:
                    resumed.restore()  # the run's saved config back: the next resume= re-reads it
                else:
                    _leave_nothing_behind(Path(cfg.paths.log_dir))
            if not isinstance(error, LipschitzLightningError):
                raise
            log.error(one_line(error))
            sys.exit(getattr(error, "exit_status", 1))

    register_search_sweeper()
    # the arguments as resolved (resume=, the rank's directory): what Lightning's DDP launcher
    # re-runs for the other processes, and what Hydra's app reads
    sys.argv[1:] = args
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(job)()


def register_search_sweeper() -> None:
    """Hydra finds its plugins by walking the ``hydra_plugins`` namespace's folders, which cannot see
    into an editable install's import hook (``pip install -e .``): the search's sweeper is registered
    by name instead, wherever the package is installed."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.lipschitz_lightning_search.search_sweeper import OptunaSearchSweeper

    Plugins.instance().register(OptunaSearchSweeper)


def job_name(args: list[str]) -> str:
    """Hydra's job name: ``train``, or what the command line says (Lightning's DDP launcher names
    its processes ``train_ddp_process_<k>``)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.job.name=")]
    return given[-1] if given else "train"


def _leave_nothing_behind(log_dir: Path) -> None:
    """A new single run that failed before training leaves no trace: its run directory goes, if it
    holds only what Hydra wrote into it, with the folders above it up to ``paths.log_dir`` that it
    leaves empty."""
    hydra_config = HydraConfig.get()
    output_dir = Path(hydra_config.runtime.output_dir)
    written_by_hydra = {output_dir / f"{hydra_config.job.name}.log"}
    if hydra_config.output_subdir is not None:
        hydra_dir = output_dir / hydra_config.output_subdir
        if any(path.name not in HYDRA_FILES for path in hydra_dir.glob("*")):
            return
        written_by_hydra.add(hydra_dir)
    if not all(path in written_by_hydra for path in output_dir.iterdir()):
        return
    shutil.rmtree(output_dir, ignore_errors=True)
    log_dir = log_dir.resolve()
    for parent in output_dir.resolve().parents:
        if parent != log_dir and log_dir not in parent.parents:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def main() -> None:
    """The ``lipschitz-train`` console script."""
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
