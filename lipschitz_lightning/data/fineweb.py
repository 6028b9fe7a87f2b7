"""FineWeb-10B GPT-2 tokens in modded-nanogpt's shard format, for the 145M NanoGPT recipe (SPEC §8-§10).

A shard ``fineweb_{train,val}_NNNNNN.bin`` is a header of 256 int32 (``[0] = 20240520`` magic,
``[1] = 1`` version, ``[2] = token count``) followed by that many uint16 GPT-2 tokens; token 50256
starts a document. Real shards hold 100M tokens (200 MB), so they are memory-mapped, never read
whole, and never downloaded at training time: ``python -m lipschitz_lightning.data.fineweb
--num-shards N --dir DIR`` fetches them once from the Hugging Face hub, as modded-nanogpt's
``data/cached_fineweb10B.py`` does.

Training reads the shards in order (no shuffling, as modded-nanogpt does), cut into sequences of
``seq_len`` tokens that never straddle a shard boundary; validation reads the first ``val_tokens``
tokens of the val shards. Every batch is a pure function of (micro-batch index, rank, world size),
so a resumed run sees exactly the batches the uninterrupted one saw.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lipschitz_lightning.core.types import PositiveInt
from lipschitz_lightning.data.common import IndexedSplitsDataModule, SequentialBatches
from lipschitz_lightning.errors import (
    ConfigError,
    DataError,
    LipschitzLightningError,
    OneLineParser,
)

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # the tokens start here
DOCUMENT_START = 50256  # GPT-2's <|endoftext|>, placed before every document
HUB_REPO = "kjj0/fineweb10B-gpt2"
HUB_TRAIN_SHARDS = 103  # FineWeb-10B: 103 train shards of 100M tokens (the last one shorter)
TRAIN_PATTERN = "fineweb_train_*.bin"
VAL_PATTERN = "fineweb_val_*.bin"


def shard_name(split: str, index: int) -> str:
    """``fineweb_train_000001.bin``: the hub's names, whose zero padding makes name order shard order."""
    return f"fineweb_{split}_{index:06d}.bin"


def download_command(directory: Path | str) -> str:
    return f"python -m lipschitz_lightning.data.fineweb --num-shards N --dir {directory}"


# ----------------------------------------------------------------------------- the shard format


def write_shard(path: str | Path, tokens) -> Path:
    """Write ``tokens`` (ints in 0..65535, any array-like) as one shard at ``path``.

    The format modded-nanogpt reads; tests use it to make small shards. Written beside the target
    and renamed, so an interrupted write never leaves a shard that looks complete.
    """
    path = Path(path)
    values = np.asarray(tokens)
    if values.ndim != 1 or (values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max)):
        raise ValueError(f"a shard holds a 1-d sequence of tokens in 0..65535, got shape {values.shape}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, values.size
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(header.tobytes())
        handle.write(values.astype(np.uint16).tobytes())
    partial.replace(path)
    return path


def read_header(path: str | Path) -> int:
    """The number of tokens in the shard at ``path``, once its header and size are known to agree.

    A corrupt or truncated shard fails here with the file's name rather than later as garbage
    tokens or an out-of-range read in the middle of a run.
    """
    path = Path(path)
    fix = "delete it and download it again with " + download_command(path.parent)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as error:
        raise DataError(f"cannot read token shard {path} ({type(error).__name__}: {error})") from error
    if header.size < HEADER_INTS:
        raise DataError(f"token shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: the file is truncated; {fix}")
    if header[0] != MAGIC:
        raise DataError(f"token shard {path} starts with magic number {header[0]}, not {MAGIC}: not a modded-nanogpt shard or corrupt; {fix}")
    if header[1] != VERSION:
        raise DataError(f"token shard {path} has format version {header[1]}; this reader reads version {VERSION} only")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"token shard {path} is {size} bytes but its header says {count} tokens ({expected} bytes): "
            f"the file is truncated or corrupt; {fix}"
        )
    return count


def read_shard(path: str | Path) -> np.memmap:
    """The shard's tokens as a read-only uint16 memory map (the header checked first)."""
    count = read_header(path)
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(directory: Path, pattern: str) -> list[Path]:
    """The shards matching ``pattern`` in name (= shard) order; none is an error naming the download."""
    shards = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if not shards:
        raise DataError(
            f"no token shards {pattern} in {directory}: download them once with `{download_command(directory)}` "
            f"(the val shard and N train shards of 100M tokens, N up to {HUB_TRAIN_SHARDS}); "
            f"data.dir chooses the folder (default: paths.data_dir/fineweb10B, paths.data_dir follows $LIPSCHITZ_DATA_DIR)"
        )
    return shards


class TokenShards:
    """The shards of one split, in order, memory-mapped on first use.

    The maps are not pickled (a pickled memmap would be a full copy of the shard): a copy of this
    object in another process maps the files again.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.lengths = [read_header(p) for p in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)  # where shard k begins
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def shard(self, k: int) -> np.ndarray:
        if self._maps[k] is None:
            self._maps[k] = read_shard(self.paths[k])
        return self._maps[k]

    def span(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the shards laid end to end (a copy; may cross shard boundaries)."""
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            begin = start - int(self.starts[k])
            piece = self.shard(k)[begin : begin + stop - start]
            pieces.append(piece)
            start += len(piece)
            k += 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.array(pieces[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.paths)}


def _check_tokens(window: np.ndarray, vocab_size: int, where) -> None:
    """Tokens at or past ``vocab_size`` fail here, naming the shard, rather than as an opaque
    device-side assert in the embedding on a GPU. ``where()`` names the place (built on error only)."""
    if window.size and int(window.max()) >= vocab_size:
        raise DataError(f"{where()} holds token {int(window.max())}, not below data.vocab_size={vocab_size}: wrong shards or wrong data.vocab_size")


def _as_batch(windows: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(B, T + 1)`` uint16 windows -> int64 inputs and next-token targets, each ``(B, T)``."""
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class TrainSequences(Dataset):
    """Training sequence ``i``: ``seq_len + 1`` consecutive tokens of one shard (inputs and targets).

    Shard ``k`` of ``n_k`` tokens gives ``(n_k - 1) // seq_len`` sequences (the last token of one is
    the first target of the next), numbered shard after shard; a sequence never straddles two shards.
    Indexed by a whole batch of sequence indices at once.
    """

    def __init__(self, shards: TokenShards, seq_len: int, vocab_size: int):
        self.shards, self.seq_len, self.vocab_size = shards, seq_len, vocab_size
        counts = [max(0, (n - 1) // seq_len) for n in shards.lengths]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first sequence of shard k

    def __len__(self) -> int:
        return int(self.first[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, token offset) where sequence ``index`` starts."""
        k = int(np.searchsorted(self.first, index, side="right")) - 1
        return k, (index - int(self.first[k])) * self.seq_len

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        windows = np.empty((len(indices), self.seq_len + 1), dtype=np.uint16)
        for row, index in enumerate(indices.tolist()):
            k, offset = self.locate(index)
            windows[row] = self.shards.shard(k)[offset : offset + self.seq_len + 1]
            _check_tokens(windows[row], self.vocab_size, lambda: f"token shard {self.shards.paths[k]} (sequence {index}, tokens from {offset})")
        return _as_batch(windows)


class ValSequences(Dataset):
    """Validation sequence ``i``: tokens ``i * seq_len`` to ``(i + 1) * seq_len`` (+1 target) of the
    val shards laid end to end, as modded-nanogpt reads its single 100M-token val shard."""

    def __init__(self, shards: TokenShards, seq_len: int, num_sequences: int, vocab_size: int):
        self.shards, self.seq_len, self.num_sequences, self.vocab_size = shards, seq_len, num_sequences, vocab_size

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        windows = np.stack([self.shards.span(i * self.seq_len, (i + 1) * self.seq_len + 1) for i in indices.tolist()])
        _check_tokens(windows, self.vocab_size, lambda: f"validation sequences {indices.tolist()} of the val shards in {self.shards.paths[0].parent}")
        return _as_batch(windows)


class SequenceStream(Sampler[Tensor]):
    """Endless index batches in order: micro-batch ``m`` of rank ``r`` in a world of ``w`` takes
    sequences ``(m * w + r) * B + j`` for ``j < B``.

    So a batch is a pure function of ``(m, r, w)`` (resume is exact: set ``start_batch``), and one
    process with batch ``B * w`` sees exactly the union of the ``w`` ranks' batches. Past the last
    sequence the stream wraps around to the first: a run longer than the data repeats it.
    """

    def __init__(self, num_sequences: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_sequences, self.batch_size = num_sequences, batch_size
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0

    def batch(self, micro_batch: int) -> Tensor:
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        return (first + torch.arange(self.batch_size)) % self.num_sequences

    def __iter__(self) -> Iterator[Tensor]:
        micro_batch = self.start_batch
        while True:
            yield self.batch(micro_batch)
            micro_batch += 1


# ----------------------------------------------------------------------------- the datamodule


class FineWebDataModule(L.LightningDataModule):
    """GPT-2 token shards (modded-nanogpt format) from ``dir``, for next-token prediction.

    Training: micro-batches of ``batch_size`` sequences of ``seq_len`` tokens per rank, read in
    shard order (see ``SequenceStream``; wraps around after the last sequence, so a long run on
    little data repeats it). Validation: the first ``val_tokens`` tokens of the val shards in
    ``val_tokens // val_seq_len`` sequences, one per batch, rank ``r`` of ``w`` taking sequences
    ``r, r + w, ...``. Batches are ``(inputs, targets)``, int64 of shape ``(batch, seq_len)``.
    """

    kind: ClassVar[str] = "tokens"
    tokenizer: ClassVar[str] = "gpt2"  # what the tokens are; sampling decodes with it (tiktoken)

    def __init__(
        self,
        dir: str,
        seq_len: PositiveInt = 48 * 1024,
        batch_size: PositiveInt = 1,
        val_seq_len: PositiveInt = 4 * 64 * 1024,
        val_tokens: PositiveInt = 10_485_760,
        vocab_size: PositiveInt = 50257,
    ):
        super().__init__()
        self.directory = Path(dir)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_seq_len, self.val_tokens, self.vocab_size = val_seq_len, val_tokens, vocab_size
        self.vocab = None  # GPT-2 BPE: no character vocabulary to save with the checkpoint
        self.splits: dict[str, Dataset] = {}

    # the rank helper every datamodule here uses (it only reads ``self.trainer``)
    _rank_world = IndexedSplitsDataModule._rank_world

    @property
    def num_val_sequences(self) -> int:
        return self.val_tokens // self.val_seq_len

    def _shards(self) -> tuple[TokenShards, TokenShards]:
        """Train and val shards, every header checked."""
        return TokenShards(find_shards(self.directory, TRAIN_PATTERN)), TokenShards(find_shards(self.directory, VAL_PATTERN))

    def _check(self, train: TokenShards, val: TokenShards, world_size: int) -> None:
        """The config fits the shards and the world: one ``ConfigError`` naming the key otherwise."""
        longest = max(train.lengths)
        if self.seq_len > longest - 1:
            raise ConfigError(
                f"data.seq_len must be at most {longest - 1} (the largest training shard in {self.directory} "
                f"holds {longest} tokens and a sequence needs seq_len + 1), got {self.seq_len}"
            )
        available = val.total
        if self.val_tokens > available - 1:
            fits = (available - 1) // self.val_seq_len * self.val_seq_len
            hint = f"e.g. {fits}" if fits else f"and data.val_seq_len at most {available - 1}"
            raise ConfigError(
                f"data.val_tokens must be at most {available - 1} (the val shards in {self.directory} hold {available} "
                f"tokens, and the last sequence needs one more as its target), {hint}; got {self.val_tokens}"
            )
        if self.val_tokens % self.val_seq_len:
            raise ConfigError(
                f"data.val_tokens must be a multiple of data.val_seq_len={self.val_seq_len} "
                f"(e.g. {max(1, self.val_tokens // self.val_seq_len) * self.val_seq_len}), got {self.val_tokens}"
            )
        self._check_world(world_size)

    def _check_world(self, world_size: int) -> None:
        if self.num_val_sequences < world_size:
            raise ConfigError(
                f"data.val_tokens // data.val_seq_len = {self.num_val_sequences} validation sequences must be at least "
                f"the {world_size} ranks (each rank needs a validation batch, or DDP hangs): "
                f"raise data.val_tokens to at least {world_size * self.val_seq_len} or lower data.val_seq_len"
            )

    def prepare_data(self) -> None:
        # never downloads: real shards are 200 MB each, fetched once with the command in the error
        train, val = self._shards()
        self._check(train, val, self._rank_world()[1])

    def setup(self, stage: str | None = None) -> None:
        train, val = self._shards()  # again: under DDP, prepare_data runs on one rank only
        self._check(train, val, self._rank_world()[1])
        if self.splits:
            return
        self.splits = {
            "train": TrainSequences(train, self.seq_len, self.vocab_size),
            "val": ValSequences(val, self.val_seq_len, self.num_val_sequences, self.vocab_size),
        }

    def train_dataloader(self) -> DataLoader:
        sampler = SequenceStream(len(self.splits["train"]), self.batch_size, *self._rank_world())
        if self.trainer is not None:
            # resume at the micro-batch the checkpointed run stopped at
            sampler.start_batch = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return DataLoader(self.splits["train"], sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_world()
        self._check_world(world_size)  # the trainer may have changed since setup
        sampler = SequentialBatches(len(self.splits["val"]), 1, rank, world_size)
        return DataLoader(self.splits["val"], sampler=sampler, batch_size=None)


# ----------------------------------------------------------------------------- the downloader


def default_dir() -> Path:
    """Where ``paths.data_dir/fineweb10B`` points by default: ``$LIPSCHITZ_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("LIPSCHITZ_DATA_DIR") or "data") / "fineweb10B"


def download(num_shards: int, directory: Path | str) -> list[Path]:
    """Fetch the val shard and the first ``num_shards`` train shards into ``directory`` from the
    hub (what modded-nanogpt's ``data/cached_fineweb10B.py`` does); files already there are kept."""
    from huggingface_hub import hf_hub_download

    directory = Path(directory)
    names = [shard_name("val", 0)] + [shard_name("train", i) for i in range(1, num_shards + 1)]
    for name in names:
        if not (directory / name).is_file():
            print(f"downloading {name} from {HUB_REPO} into {directory}", flush=True)
            try:
                hf_hub_download(repo_id=HUB_REPO, filename=name, repo_type="dataset", local_dir=str(directory))
            except Exception as error:  # the hub client raises many kinds when offline
                first_line = str(error).splitlines()[0] if str(error) else ""
                raise DataError(
                    f"download of {name} from the Hugging Face dataset {HUB_REPO} into {directory} failed "
                    f"({type(error).__name__}: {first_line}); run again with network access (files already there are kept), "
                    f"or copy the shards into {directory} by hand"
                ) from error
        read_header(directory / name)  # a bad download fails now, not at training time
    return [directory / name for name in names]


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(
        prog="python -m lipschitz_lightning.data.fineweb",
        description="Download FineWeb-10B GPT-2 token shards (100M tokens, 200 MB each) for the NanoGPT recipe.",
    )
    parser.add_argument(
        "--num-shards", type=int, required=True,
        help=f"train shards to fetch, 1..{HUB_TRAIN_SHARDS}; the 8-GPU recipe (6200 steps of 8 x 49152 tokens) reads 25",
    )
    parser.add_argument("--dir", type=Path, default=default_dir(), help="target folder (default: $LIPSCHITZ_DATA_DIR/fineweb10B or ./data/fineweb10B)")
    args = parser.parse_args(argv)
    if not 1 <= args.num_shards <= HUB_TRAIN_SHARDS:
        parser.error(f"--num-shards must be in 1..{HUB_TRAIN_SHARDS}, got {args.num_shards}")
    try:
        paths = download(args.num_shards, args.dir)
    except LipschitzLightningError as error:
        sys.exit(f"error: {error}")
    print(f"{len(paths)} shards in {args.dir}; train with data=fineweb data.dir={args.dir}")


if __name__ == "__main__":
    main()
