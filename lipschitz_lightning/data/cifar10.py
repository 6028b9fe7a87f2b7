"""CIFAR-10 as the hub's parquet layout, decoded once into a uint8 tensor (SPEC §8, §10)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from typing import Annotated

import annotated_types as at

from lipschitz_lightning.core.types import NonNegativeInt, PositiveInt
from lipschitz_lightning.data.common import (
    BatchTensorDataset,
    IndexedSplitsDataModule,
    cached_tensors,
    default_cache_dir,
    ensure_local,
)
from lipschitz_lightning.errors import DataError

HUB_ID = "uoft-cs/cifar10"
SPLITS = {"train": "train", "test": "test"}  # the paper validates on the test split (holdout 0)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def _download(scratch: Path) -> None:
    """The hub's parquet splits into ``scratch``; the hub's own cache lives there too, so nothing
    stays behind in ~/.cache/huggingface."""
    import datasets

    hub = datasets.load_dataset(HUB_ID, cache_dir=str(scratch / "hub-cache"))
    for split in SPLITS.values():
        hub[split].to_parquet(str(scratch / f"{split}.parquet"))


def decode_parquet(path: Path) -> dict[str, torch.Tensor]:
    """Read ``img`` (PNG/JPEG bytes) and ``label`` with ``datasets``; decode all images once."""
    import datasets
    from PIL import Image

    try:
        table = datasets.Dataset.from_parquet(str(path)).cast_column("img", datasets.Image(decode=False))
        encoded = table.data.column("img").to_pylist()
        labels = torch.tensor(table.data.column("label").to_pylist(), dtype=torch.int64)
        # PIL directly on the bytes: 5x faster than datasets' per-row numpy decode
        images = np.stack([np.asarray(Image.open(io.BytesIO(e["bytes"])).convert("RGB")) for e in encoded])
    except Exception as error:
        raise DataError(
            f"cannot read CIFAR-10 from {path} ({type(error).__name__}: {error}); "
            f"the file is corrupt or not the hub's layout (columns img, label): delete it to re-download"
        ) from error
    if images.shape[1:] != (32, 32, 3) or labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{path} does not hold 32x32 RGB images with labels 0..9")
    return {"images": torch.from_numpy(images), "labels": labels}


def crop_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips of a whole ``(N, H, W, C)``
    batch in one gather: each image's rows and columns are index ranges shifted by its own offset,
    a flipped image's columns read backwards. No Python per image."""
    n, height, width, _ = images.shape
    device = images.device
    if padding:
        images = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    rows = shifts[0, :, None] + torch.arange(height, device=device)
    columns = shifts[1, :, None] + torch.arange(width, device=device)
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        columns = torch.where(flipped[:, None], columns.flip(1), columns)
    return images[torch.arange(n, device=device)[:, None, None], rows[:, :, None], columns[:, None, :]]


class CIFAR10DataModule(IndexedSplitsDataModule):
    """Images stay uint8 (HWC) until they reach the device, then become floats in [0, 1].

    ``holdout``: validate on the last ``holdout`` of the 50,000 training images (and train on the
    rest) instead of on the test split, which is then evaluated once, after training (``test/``
    metrics): what a search must tune on. ``crop_padding`` / ``flip``: random crops of the
    zero-padded image and horizontal flips of training batches, on the device, seeded by
    ``(seed, step, micro-batch, rank)`` so a resumed run sees the same batches. All off by default (the paper's runs).
    """

    kind = "images"

    def __init__(
        self,
        data_dir: str,
        batch_size: PositiveInt = 512,
        val_batch_size: PositiveInt = 512,
        seed: NonNegativeInt = 0,
        cache_dir: str | None = None,
        holdout: Annotated[int, at.Interval(ge=0, le=49_000)] = 0,
        crop_padding: Annotated[int, at.Interval(ge=0, le=16)] = 0,
        flip: bool = False,
    ):
        super().__init__()
        self.directory = Path(data_dir) / "cifar10"
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed
        self.holdout, self.crop_padding, self.flip = holdout, crop_padding, flip
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.splits: dict[str, BatchTensorDataset] = {}
        self._last_step, self._micro_batch = -1, 0  # which micro-batch of its step a training batch is

    @property
    def holds_out_validation(self) -> bool:
        return self.holdout > 0

    def files(self) -> dict[str, Path]:
        return {name: self.directory / f"{split}.parquet" for name, split in SPLITS.items()}

    def prepare_data(self) -> None:
        files = self.files()
        ensure_local(list(files.values()), _download, "CIFAR-10 parquet files", f"{HUB_ID} from the Hugging Face hub", _hub_host())
        for path in files.values():
            cached_tensors(path, "uint8", lambda: decode_parquet(path), self.cache_dir, load=False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        loaded = {}
        for name, path in self.files().items():
            tensors = cached_tensors(path, "uint8", lambda: decode_parquet(path), self.cache_dir)
            loaded[name] = (tensors["images"], tensors["labels"])
        images, labels = loaded["train"]
        if self.holdout:
            keep = len(labels) - self.holdout
            self.splits["train"] = BatchTensorDataset(images[:keep], labels[:keep])
            self.splits["val"] = BatchTensorDataset(images[keep:], labels[keep:])
            self.splits["test"] = BatchTensorDataset(*loaded["test"])
        else:
            self.splits["train"] = BatchTensorDataset(images, labels)
            self.splits["val"] = BatchTensorDataset(*loaded["test"])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        trainer = self.trainer
        if (self.crop_padding or self.flip) and trainer is not None and trainer.training:
            images = crop_and_flip(images, self.crop_padding, self.flip, self._augmentation_generator(images.device))
        return images.float().div_(255), labels

    def _augmentation_generator(self, device: torch.device) -> torch.Generator:
        """Seeded by (seed, step, micro-batch of the step, rank): every batch of a run gets its own
        offsets, DDP ranks and the micro-batches of an accumulated step included, and a resumed run
        (which starts at a step boundary) draws the same ones again."""
        step, rank = self.trainer.global_step, self.trainer.global_rank
        micro = self._micro_batch + 1 if self._last_step == step else 0
        self._last_step, self._micro_batch = step, micro
        seed = np.random.SeedSequence([self.seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator(device).manual_seed(int(seed))
