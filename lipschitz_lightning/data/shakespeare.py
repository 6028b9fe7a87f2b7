"""Character-level Tiny Shakespeare (SPEC §10): vocab = the sorted characters (65), first 90% of
the text to train on, last 10% to validate on.

Training batches are random windows, a pure function of (seed, step) so that resume is exact;
validation is the whole validation split cut into non-overlapping windows (435 of 256 tokens).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lipschitz_lightning.core.types import NonNegativeInt, PositiveInt
from lipschitz_lightning.data.common import IndexedSplitsDataModule, ensure_local
from lipschitz_lightning.errors import ConfigError, DataError

SOURCE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TRAIN_FRACTION = 0.9


def _download(scratch: Path) -> None:
    with urllib.request.urlopen(SOURCE_URL, timeout=60) as response:
        (scratch / "input.txt").write_bytes(response.read())


class CharVocab:
    """Characters <-> token ids, ids in sorted character order."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(
                f"{''.join(unknown)!r} not in the vocabulary of {len(self)} characters {self.chars!r}"
            )
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


class Windows(Dataset):
    """Window ``i`` starts at ``i * stride``; indexed by a whole batch of window indices at once."""

    def __init__(self, tokens: Tensor, seq_len: int, stride: int):
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        windows = self.tokens[indices[:, None] * self.stride + self.offsets]
        return windows[:, :-1], windows[:, 1:]


class ShakespeareDataModule(IndexedSplitsDataModule):
    kind = "tokens"

    def __init__(
        self,
        data_dir: str,
        seq_len: PositiveInt = 256,
        batch_size: PositiveInt = 512,
        val_batch_size: PositiveInt = 64,
        vocab_size: PositiveInt = 65,
        seed: NonNegativeInt = 0,
    ):
        super().__init__()
        self.path = Path(data_dir) / "tinyshakespeare" / "input.txt"
        self.seq_len, self.batch_size, self.val_batch_size = seq_len, batch_size, val_batch_size
        self.vocab_size, self.seed = vocab_size, seed
        self.vocab: CharVocab | None = None
        self.splits: dict[str, Windows] = {}

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read Tiny Shakespeare from {self.path} ({type(error).__name__}: {error})") from error

    def prepare_data(self) -> None:
        ensure_local([self.path], _download, "Tiny Shakespeare (input.txt)", SOURCE_URL, urlparse(SOURCE_URL).hostname)
        self._check(self._read())

    def _check(self, text: str) -> CharVocab:
        """The text's vocabulary, once it is known to fit the configured sizes."""
        vocab = CharVocab.from_text(text)
        if len(vocab) != self.vocab_size:
            raise ConfigError(
                f"data.vocab_size must be the number of distinct characters in {self.path}, {len(vocab)}, got {self.vocab_size}"
            )
        validation_length = len(text) - int(TRAIN_FRACTION * len(text))
        if self.seq_len + 1 > validation_length:
            raise ConfigError(
                f"data.seq_len must be shorter than the validation text ({validation_length} characters), got {self.seq_len}"
            )
        return vocab

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        text = self._read()
        self.vocab = self._check(text)  # again: under DDP, prepare_data runs on one rank only
        tokens = self.vocab.encode(text)
        split = int(TRAIN_FRACTION * len(tokens))
        self.splits = {
            "train": Windows(tokens[:split], self.seq_len, stride=1),
            "val": Windows(tokens[split:], self.seq_len, stride=self.seq_len),
        }
