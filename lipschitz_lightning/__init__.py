"""Training with enforced Lipschitz constants: Hydra configs, PyTorch Lightning, pure-torch math."""

from pathlib import Path

from omegaconf import OmegaConf

# conf/train.yaml puts <project root>/sweeps on Hydra's search path through this resolver, so
# `+sweep=...` works from any working directory (a relative file:// path would not).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("lipschitz_lightning.project_root", lambda: str(PROJECT_ROOT), replace=True)
