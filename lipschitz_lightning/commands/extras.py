"""What only one job needs is an extra of the package (pyproject.toml's optional-dependencies), not a
dependency of every install: its import happens here, where it is used, and a missing one is the one
line that names the extra which installs it.

    plots    matplotlib   report's tradeoff.png, certify's certify.png
    nanogpt  tiktoken     sampling a checkpoint that reads GPT-2 tokens (model=nanogpt)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lipschitz_lightning.errors import ConfigError

# the extra that installs each optional module (the tests check these against pyproject.toml)
EXTRAS = {"matplotlib": "plots", "tiktoken": "nanogpt"}


def needs(module: str, purpose: str) -> ModuleType:
    """``module`` imported; if it is missing, ``ConfigError``:
    ``<purpose>: pip install "lipschitz-lightning[<extra>]"``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f'{purpose}: pip install "lipschitz-lightning[{EXTRAS[module]}]"') from None


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, drawing into files only (Agg: no display on clusters or CI)."""
    matplotlib = needs("matplotlib", "plots need matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
