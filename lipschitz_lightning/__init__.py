"""Training with enforced Lipschitz constants: Hydra configs, PyTorch Lightning, pure-torch math."""

from pathlib import Path

from omegaconf import OmegaConf

# conf/train.yaml puts <project root>/sweeps on Hydra's search path through this resolver, so
# `+sweep=...` works from any working directory (a relative file:// path would not).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("lipschitz_lightning.project_root", lambda: str(PROJECT_ROOT), replace=True)
# max of numbers, for settings that must cover two others (the model's longest sequence)
OmegaConf.register_new_resolver("lipschitz_lightning.max", lambda *values: max(values), replace=True)


def _if_cuda(on_gpu, otherwise):
    import torch

    return on_gpu if torch.cuda.is_available() else otherwise


# a setting that differs on a GPU (bfloat16 autocast, bfloat16 Newton-Schulz) and on a CPU
OmegaConf.register_new_resolver("lipschitz_lightning.if_cuda", _if_cuda, replace=True)
