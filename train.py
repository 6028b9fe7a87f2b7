"""Train a network whose Lipschitz constant is enforced throughout training.

    python train.py                                   # MLP on CIFAR-10, Muon + spectral soft cap
    python train.py optimizer=adamw constraint=none   # the unconstrained baseline
    python train.py experiment=cifar_mlp_adamw_baseline
    python train.py resume=logs/train/runs/<run>      # continue a run with its own settings
    python train.py +sweep=cifar_tradeoff             # a tradeoff grid (Hydra multirun), see sweeps/
"""

import sys

from lipschitz_lightning.train import run

if __name__ == "__main__":
    run(sys.argv[1:])
