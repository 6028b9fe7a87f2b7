"""The documented Python API of the bounds, kept where the README has always shown it: the
functions live in ``lipschitz_lightning.core.bounds``."""

from lipschitz_lightning.core.bounds import *  # noqa: F401,F403
