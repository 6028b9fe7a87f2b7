"""Datamodules, one per dataset."""

from lipschitz_lightning.data.cifar10 import CIFAR10DataModule

__all__ = ["CIFAR10DataModule"]
