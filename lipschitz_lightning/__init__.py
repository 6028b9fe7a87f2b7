"""Training with enforced Lipschitz constants: Hydra configs, PyTorch Lightning, pure-torch math.

Importing the package changes nothing outside it. The entry points (``train.py``, the commands)
register the config resolvers (``config.compose.register_resolvers``) and set what is process-wide.
"""

from pathlib import Path

# conf/ and sweeps/ stay at the repository's root. A checkout, and the editable install that points
# at it (pip install -e .), read them there; an installed wheel (pip install .) carries them inside
# the package (pyproject.toml's package-dir). Every command finds them through these two names.
_PACKAGE_DIR = Path(__file__).resolve().parent
_CONFIG_ROOT = _PACKAGE_DIR if (_PACKAGE_DIR / "conf").is_dir() else _PACKAGE_DIR.parent
CONF_DIR = _CONFIG_ROOT / "conf"  # the Hydra configs every command composes
SWEEPS_DIR = _CONFIG_ROOT / "sweeps"  # the multirun grids, pairs and searches (on train's search path)


def __getattr__(name: str):
    # ``from lipschitz_lightning import WeightConstraint``: the callback loads Lightning, which the
    # package's import leaves to whoever asks for it (the commands' --help stays quick)
    if name == "WeightConstraint":
        from lipschitz_lightning.lit.constraint import WeightConstraint

        return WeightConstraint
    raise AttributeError(f"module 'lipschitz_lightning' has no attribute {name!r}")
