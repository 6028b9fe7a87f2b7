"""The CIFAR-10 datamodule: hub layout, decode cache, resumable batches, clear errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from lipschitz_lightning.data import CIFAR10DataModule
from lipschitz_lightning.data.common import BatchTensorDataset, ResumableRandomBatches
from lipschitz_lightning.errors import DataError


def test_decoded_images_equal_the_parquet_images_and_are_cached(tiny_cifar, tmp_path):
    dm = CIFAR10DataModule(str(tiny_cifar), batch_size=16, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    dm.setup()
    images, labels = dm.splits["train"].tensors
    assert images.dtype == torch.uint8 and images.shape == (256, 32, 32, 3)
    table = datasets.Dataset.from_parquet(str(tiny_cifar / "cifar10" / "train.parquet"))
    for i in (0, 17, 255):
        expected = np.asarray(table[i]["img"].convert("RGB"))
        assert np.array_equal(images[i].numpy(), expected)
        assert labels[i] == table[i]["label"]


def test_batches_reach_the_model_as_floats_in_unit_range(tiny_cifar, tmp_path):
    dm = CIFAR10DataModule(str(tiny_cifar), batch_size=16, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.dtype == torch.float32 and x.shape == (16, 32, 32, 3) and 0 <= x.min() and x.max() <= 1
    assert len(dm.val_dataloader()) == 128 // 512 + 1


def test_a_batch_of_indices_gives_what_tensor_indexing_gives():
    images, labels = torch.randint(0, 256, (50, 4, 4, 3), dtype=torch.uint8), torch.arange(50) % 10
    dataset = BatchTensorDataset(images, labels)
    indices = torch.tensor([7, 0, 49, 7, 23])
    x, y = dataset[indices]
    assert torch.equal(x, images[indices]) and torch.equal(y, labels[indices])
    x, y = dataset[3]  # a single index as TensorDataset has it
    assert torch.equal(x, images[3]) and y == labels[3]


def test_batch_stream_is_a_function_of_seed_and_position():
    stream = ResumableRandomBatches(100, 30, seed=3)
    whole = [b for _, b in zip(range(10), stream)]
    # every epoch (3 batches of 30, 10 left over) is a permutation without repeats
    assert len(set(torch.cat(whole[:3]).tolist())) == 90
    resumed = ResumableRandomBatches(100, 30, seed=3)
    resumed.start_batch = 4
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], resumed))
    # DDP ranks interleave the same global stream
    ranks = [ResumableRandomBatches(100, 30, seed=3, rank=r, world_size=2) for r in (0, 1)]
    firsts = [next(iter(r)) for r in ranks]
    assert torch.equal(firsts[0], whole[0]) and torch.equal(firsts[1], whole[1])


def test_offline_without_local_copy_says_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dm = CIFAR10DataModule(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "paths.data_dir" in message and "LIPSCHITZ_DATA_DIR" in message and "network" in message
    assert "\n" not in message


def test_wrong_columns_are_a_clear_error(tmp_path):
    directory = tmp_path / "cifar10"
    directory.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": [b"x"], "y": [1]}).to_parquet(str(directory / f"{split}.parquet"))
    dm = CIFAR10DataModule(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"test\.parquet|train\.parquet"):
        dm.prepare_data()


def test_validation_gives_every_rank_a_batch():
    from lipschitz_lightning.data.common import SequentialBatches

    # the Shakespeare split: 435 windows in batches of 64 are 7 batches, fewer than 8 GPUs
    ranks = [list(SequentialBatches(435, 64, rank, 8)) for rank in range(8)]
    assert all(len(batches) >= 1 for batches in ranks)
    seen = torch.cat([index for batches in ranks for index in batches])
    assert sorted(seen.tolist()) == list(range(435))
