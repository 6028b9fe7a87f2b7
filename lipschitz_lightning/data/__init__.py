"""Datamodules, one per dataset. ``fineweb`` is not imported here: it is also the downloader
``python -m lipschitz_lightning.data.fineweb``, which runpy must find unimported."""

from lipschitz_lightning.data.cifar10 import CIFAR10DataModule
from lipschitz_lightning.data.shakespeare import ShakespeareDataModule

__all__ = ["CIFAR10DataModule", "ShakespeareDataModule"]
