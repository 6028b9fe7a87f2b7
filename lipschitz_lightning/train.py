"""Train a network whose Lipschitz constant is enforced throughout training: the command behind the
root ``train.py``, ``python -m lipschitz_lightning.train`` and the ``lipschitz-train`` console script
(the same Hydra app over ``conf/train.yaml``, found through ``CONF_DIR``, so it runs from an installed
package as from a checkout).

    python train.py                                   # MLP on CIFAR-10, Muon + spectral soft cap
    python train.py optimizer=adamw constraint=none   # the unconstrained baseline
    python train.py experiment=cifar_mlp_adamw_baseline
    python train.py resume=logs/train/runs/<run>      # continue a run with its own settings
    python train.py +sweep=cifar_tradeoff             # a tradeoff grid (Hydra multirun), see sweeps/
"""

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import run_job
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from lipschitz_lightning import CONF_DIR
from lipschitz_lightning.commands import search
from lipschitz_lightning.commands.cli import (
    HYDRA_FILES,
    check_composition,
    quiet_known_warnings,
    rank_arguments,
    register_resolvers,
    resume_arguments,
    set_cuda_allocator,
    user_code_on_path,
)
from lipschitz_lightning.commands.settings import validate_config
from lipschitz_lightning.errors import (
    ConfigError,
    LipschitzLightningError,
    Preempted,
    exit_with,
    one_line,
)

log = logging.getLogger("lipschitz_lightning")


def run(args: list[str]) -> None:
    """The train command's line. A single run's config is composed once (Hydra's compose API, an
    unknown option or key one line) and checked once, before anything is built or written; Hydra's
    ``run_job`` then runs it (run directory, ``.hydra/`` files, job logging) without composing it
    again. Hydra's flags (``--cfg``, ``--help``) and multiruns (``-m``, a sweep) go to Hydra's app,
    which composes each job, checked inside it."""
    set_cuda_allocator()  # before torch is imported
    register_resolvers()
    user_code_on_path(args)  # a _target_ of the user's own: from the working folder or a hydra.searchpath folder
    if search.requested(args):  # +hparams_search=<pair>: an Optuna study, its trials run here (commands/search.py)
        return search.run(args)
    try:
        args, resumed = resume_arguments(args)
        args = rank_arguments(args)
        composed = check_composition("train", args, job_name=job_name(args))
        if composed is not None:
            validate_config(composed)  # every setting, before the run directory exists
    except ConfigError as error:
        exit_with(error)

    def job(cfg: DictConfig) -> float | None:
        # torch and Lightning load here, not at import: --cfg job, --help and Hydra's errors stay
        # quick, and Lightning's notices find Hydra's logging already set up (so they reach train.log)
        from lipschitz_lightning.commands.allocator import keep_freed_memory
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
            built = build(cfg, checked=composed is not None)  # resume and data checks: nothing trained yet
            summary = train(cfg, built)
            if cfg.get("optimized_metrics"):  # a sweeper plugin's objectives, in its order
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

    # the arguments as resolved (resume=, the rank's directory): what Lightning's DDP launcher
    # re-runs for the other processes, and what Hydra's app reads
    sys.argv[1:] = args
    if composed is not None and not composed.hydra.callbacks:  # a user's Hydra callbacks: Hydra's app calls them
        with read_write(composed.hydra):
            composed.hydra.mode = RunMode.RUN
        result = run_job(task_function=job, config=composed, job_dir_key="hydra.run.dir", job_subdir_key=None,
                         hydra_context=HydraContext(config_loader=None, callbacks=_NoCallbacks()))
        result.return_value  # noqa: B018  (raises what the job raised, as Hydra's own run does)
        return
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(job)()


def job_name(args: list[str]) -> str:
    """Hydra's job name: ``train``, or what the command line says (Lightning's DDP launcher names
    its processes ``train_ddp_process_<k>``)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.job.name=")]
    return given[-1] if given else "train"


class _NoCallbacks:
    """``run_job``'s callbacks where ``hydra.callbacks`` is empty (this project registers none)."""

    def on_job_start(self, **kwargs) -> None:
        pass

    def on_job_end(self, **kwargs) -> None:
        pass


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
