"""The documented Python API of the constraints, kept where the README has always shown it: the
functions live in ``lipschitz_lightning.core`` (``core.constraints``, ``core.linalg``)."""

from lipschitz_lightning.core.constraints import *  # noqa: F401,F403
