"""Datamodules, one per dataset."""

from lipschitz_lightning.data.cifar10 import CIFAR10DataModule
from lipschitz_lightning.data.shakespeare import ShakespeareDataModule

__all__ = ["CIFAR10DataModule", "ShakespeareDataModule"]
