"""Networks, one file each. Each exposes ``param_specs()``, ``layer_norms()`` and ``certified_bound()``."""

from lipschitz_lightning.models.gpt import GPT
from lipschitz_lightning.models.mlp import MLP
from lipschitz_lightning.models.vit import ViT

__all__ = ["GPT", "MLP", "ViT"]
