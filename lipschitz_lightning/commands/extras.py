"""What only one job needs is an extra of the package (pyproject.toml's optional-dependencies), not a
dependency of every install: its import happens here, where it is used, and a missing one is the one
line that names the extra which installs it.

    plots    matplotlib   report's tradeoff.png and stability.png, certify's certify.png
    nanogpt  tiktoken     sampling a checkpoint that reads GPT-2 tokens (model=nanogpt)
    search   optuna       +hparams_search=<pair> (commands/search.py), reading its study (and
                          sqlalchemy, which Optuna brings, to print a storage URL's password hidden)

One module is installed apart, by its own line (README.md's install has it): torchattacks, certify's
AutoAttack, whose package declares torchvision and pins requests~=2.25, neither of which its code
imports, and either of which would break this environment; no extra can say "without its
dependencies". What its code does import besides torch and numpy (scipy, tqdm) is the extra attacks.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lipschitz_lightning.errors import ConfigError

# the extra that installs each optional module (the tests check these against pyproject.toml)
EXTRAS = {"matplotlib": "plots", "tiktoken": "nanogpt", "optuna": "search", "sqlalchemy": "search", "scipy": "attacks"}
# what installs each optional module that no extra can
APART = {"torchattacks": 'pip install "lipschitz-lightning[attacks]" && pip install --no-deps torchattacks==3.5.1'}


def install_line(module: str) -> str:
    return APART[module] if module in APART else f'pip install "lipschitz-lightning[{EXTRAS[module]}]"'


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(module: str, purpose: str) -> ModuleType:
    """``module`` imported; if it is missing, ``ConfigError``: ``<purpose>: <the line that installs it>``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # the module may be there and one of its own imports missing (torchattacks without scipy)
        missing = (error.name or module).partition(".")[0]
        line = install_line(missing) if missing in EXTRAS or missing in APART else f"pip install {missing}"
        raise ConfigError(f"{purpose}: {line}") from None


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, drawing into files only (Agg: no display on clusters or CI)."""
    matplotlib = needs("matplotlib", "plots need matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
