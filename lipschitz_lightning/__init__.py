"""Training with enforced Lipschitz constants: Hydra configs, PyTorch Lightning, pure-torch math.

Importing the package changes nothing outside it. The entry points (``train.py``, the commands)
register the config resolvers (``cli.register_resolvers``) and set what is process-wide.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"  # the Hydra configs every command composes
