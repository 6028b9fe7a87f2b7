"""Train a network whose Lipschitz constant is enforced throughout training.

    python train.py                                   # MLP on CIFAR-10, Muon + spectral soft cap
    python train.py optimizer=adamw constraint=none   # the unconstrained baseline
    python train.py experiment=cifar_mlp_adamw_baseline
    python train.py +sweep=cifar_tradeoff             # a tradeoff grid (Hydra multirun), see sweeps/
"""

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lipschitz_lightning.errors import ConfigError, LipschitzLightningError
from lipschitz_lightning.training import in_multirun, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg).get("val/acc")
    except LipschitzLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        if in_multirun():
            # one diverged or misconfigured grid point is a result, not a reason to stop the sweep:
            # its summary.json says failed and the report lists it
            return None
        if isinstance(error, ConfigError):
            # rejected before any work: leave no run directory behind
            shutil.rmtree(Path(cfg.paths.output_dir), ignore_errors=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
