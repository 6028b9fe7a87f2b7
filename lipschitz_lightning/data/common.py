"""What every datamodule shares: finding or fetching files, a decode cache, resumable batches, the
first test examples as a module sees them."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lipschitz_lightning.errors import DataError


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIPSCHITZ_CACHE_DIR", Path.home() / ".cache" / "lipschitz_lightning"))


# how long the one connectivity check before a download may take
CONNECT_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def offline_reason(host: str, port: int = 443) -> str | None:
    """Why a download from ``host`` cannot work now, or None when it may.

    Checked once, in at most a few seconds: left to itself, the hub client retries for half a
    minute before it gives up. ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) turns off every
    download of this project, not only the hub's.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]} is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows whether the host is reachable: let the download try
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host} cannot be reached ({type(error).__name__}: {error})"
    return None


def ensure_local(files: list[Path], download: Callable[[Path], None], what: str, source: str, host: str) -> None:
    """Make sure ``files`` (all in one folder) exist, downloading them when they do not.

    ``download(folder)`` writes the files, under their own names, into an empty scratch folder;
    they are moved into place only once all of them are there, so a failed or interrupted download
    creates nothing (not even the data folder). Offline with no local copy, one error within a few
    seconds that says both ways to fix it.
    """
    if all(f.is_file() for f in files):
        return
    directory = files[0].parent
    names = ", ".join(f.name for f in files)
    fix = (
        f"Fix: put {names} there and point paths.data_dir (or $LIPSCHITZ_DATA_DIR) at its parent, "
        f"or run once with network access so it is downloaded into paths.data_dir"
    )
    reason = offline_reason(host)
    if reason:
        raise DataError(f"{what} not found in {directory}, and {reason}, so nothing was downloaded. {fix}")
    with tempfile.TemporaryDirectory(prefix="lipschitz-download-") as scratch:
        try:
            download(Path(scratch))
        except Exception as error:  # the hub client raises many kinds when offline
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise DataError(
                f"{what} not found in {directory} and the download of {source} failed ({type(error).__name__}: {first_line}). {fix}"
            ) from error
        missing = [f.name for f in files if not (Path(scratch) / f.name).is_file()]
        if missing:
            raise DataError(f"download of {source} did not produce {missing}")
        directory.mkdir(parents=True, exist_ok=True)
        for f in files:
            partial = f.with_name(f.name + ".partial")
            shutil.move(Path(scratch) / f.name, partial)
            partial.replace(f)  # a reader never sees half a file


def cached_tensors(
    source: Path, tag: str, decode: Callable[[], dict[str, torch.Tensor]], cache_dir: Path, load: bool = True
) -> dict[str, torch.Tensor] | None:
    """``decode()`` once per source file version, then load the tensors from the cache.

    With ``load=False`` (``prepare_data``: make sure the cache exists) a cached file is not read.
    """
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tag}".encode()).hexdigest()[:16]
    path = cache_dir / f"{source.stem}-{tag}-{key}.pt"
    if path.is_file() and not load:
        return None
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            pass  # a cache file cut short by a killed run: decode again
    tensors = decode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save(tensors, partial)
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs the decode next time
    return tensors


class ResumableRandomBatches(Sampler[torch.Tensor]):
    """An endless stream of index batches, a fresh permutation each epoch, seeded by epoch.

    Batch ``i`` is a pure function of ``(seed, i)``, so a resumed run that starts at the batch it
    stopped at sees exactly the batches the uninterrupted run saw. Under DDP, rank ``r`` of ``w``
    takes global batches ``r, r + w, ...``.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size > num_examples:
            raise DataError(f"data.batch_size={batch_size} is larger than the {num_examples} training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        per_epoch = self.num_examples // self.batch_size
        local = self.start_batch
        epoch, permutation = -1, None
        while True:
            global_batch = local * self.world_size + self.rank
            batch_epoch, position = divmod(global_batch, per_epoch)
            if batch_epoch != epoch:
                epoch, permutation = batch_epoch, self._permutation(batch_epoch)
            yield permutation[position * self.batch_size : (position + 1) * self.batch_size]
            local += 1


class SequentialBatches(Sampler[torch.Tensor]):
    """Index batches over the whole split in order, the last one possibly short.

    Under DDP, rank ``r`` of ``w`` takes examples ``r, r + w, ...`` (not whole batches: 7 batches
    over 8 GPUs would leave one rank none), so every rank validates at least one batch whenever
    the split has ``w`` examples, and takes part in every collective of the validation's end.
    """

    def __init__(self, num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.batches = list(torch.arange(num_examples)[rank::world_size].split(batch_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchTensorDataset(TensorDataset):
    """``TensorDataset`` indexed by a whole batch of indices at once through ``index_select``: for
    CIFAR's 512 images of 3 KiB, 0.06 ms on a CPU against 0.8 ms for ``tensor[indices]``."""

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            return tuple(tensor.index_select(0, index) for tensor in self.tensors)
        return super().__getitem__(index)



class IndexedSplitsDataModule(L.LightningDataModule):
    """The dataloaders every datamodule here shares. A subclass fills ``self.splits`` (``train``,
    ``val``: datasets indexed by a whole batch of indices at once) in ``setup`` and sets
    ``batch_size``, ``val_batch_size`` and ``seed``."""

    splits: dict
    batch_size: int
    val_batch_size: int
    seed: int

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableRandomBatches(len(self.splits["train"]), self.batch_size, self.seed, *self._rank_world())
        if self.trainer is not None:
            # resume at the micro-batch the checkpointed run stopped at
            sampler.start_batch = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return DataLoader(self.splits["train"], sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._in_order("val")

    def test_dataloader(self) -> DataLoader:
        return self._in_order("test")

    def _in_order(self, split: str) -> DataLoader:
        sampler = SequentialBatches(len(self.splits[split]), self.val_batch_size, *self._rank_world())
        return DataLoader(self.splits[split], sampler=sampler, batch_size=None)


def evaluation_examples(datamodule, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` test examples (all when None) of a set-up datamodule, as the module sees
    them (after ``on_after_batch_transfer``), inputs in float32: the validation split, or the test
    split of a run that validated on examples held out of training (``holds_out_validation``:
    ``data.holdout``)."""
    xs, ys, count = [], [], 0
    held_out = getattr(datamodule, "holds_out_validation", False)
    for batch in datamodule.test_dataloader() if held_out else datamodule.val_dataloader():
        x, y = datamodule.on_after_batch_transfer(batch, 0)
        xs.append(x), ys.append(y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    return torch.cat(xs)[:limit].float(), torch.cat(ys)[:limit]
