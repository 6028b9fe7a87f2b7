"""The project's Optuna search as a Hydra sweeper (``+hparams_search=<pair>``), so that a search runs
through the same ``@hydra.main`` job as a single run and a grid (lipschitz_lightning/train.py), as
the Lightning-Hydra template's searches do through ``hydra-optuna-sweeper``.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, hence this folder beside the
package; the search itself is ``lipschitz_lightning.commands.search``. Imports nothing heavy: Hydra
imports every plugin module at start-up.
"""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSearchSweeper(Sweeper):
    """Asks the study for each trial's point, launches the trial with Hydra's launcher (one run
    directory per trial, the job of a single run), tells the study what its summary says."""

    def __init__(self) -> None:
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from lipschitz_lightning.commands import search

        return search.sweep(arguments, lambda overrides, number: self.launcher.launch([overrides], initial_job_idx=number)[0])
