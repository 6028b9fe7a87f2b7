"""The FineWeb token-shard datamodule: shard format, clear errors, exact resume, rank split, downloader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lipschitz_lightning.data.fineweb import FineWebDataModule
from lipschitz_lightning.data import fineweb
from lipschitz_lightning.data.fineweb import read_header, read_shard, write_shard
from lipschitz_lightning.errors import ConfigError, DataError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# train shards of 101 and 61 tokens: with seq_len 10, 10 + 6 = 16 sequences; val of 81 tokens
TRAIN_LENGTHS = (101, 61)
VAL_LENGTH = 81


def stand_in_trainer(global_step: int = 0, rank: int = 0, world_size: int = 1, accumulate: int = 1):
    """What the datamodule reads of a Lightning trainer."""
    return SimpleNamespace(global_step=global_step, global_rank=rank, world_size=world_size,
                           accumulate_grad_batches=accumulate)


@pytest.fixture
def shards(tmp_path) -> Path:
    """Small shards whose token at position p of train shard k is 1000 * k + p (easy to locate)."""
    for k, length in enumerate(TRAIN_LENGTHS, start=1):
        write_shard(tmp_path / f"fineweb_train_{k:06d}.bin", 1000 * k + np.arange(length))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(VAL_LENGTH) + 5000)
    return tmp_path


def datamodule(directory, trainer=None, **overrides) -> FineWebDataModule:
    settings = dict(seq_len=10, batch_size=2, val_seq_len=8, val_tokens=64, vocab_size=50257) | overrides
    dm = FineWebDataModule(str(directory), **settings)
    dm.trainer = trainer
    dm.prepare_data()
    dm.setup("fit")
    return dm


def first_batches(dm: FineWebDataModule, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _, batch in zip(range(count), dm.train_dataloader())]


# ----------------------------------------------------------------------------- the shard format


def test_written_shard_reads_back_header_and_tokens_memory_mapped(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 464, 50256, 7])
    path = write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, 7] and not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * 7 and read_header(path) == 7
    mapped = read_shard(path)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16
    assert mapped.tolist() == tokens.tolist()


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-6]
    else:
        data[0 if how == "magic" else 4 : 4 if how == "magic" else 8] = np.int32(7).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "says"), [("magic", "magic number 7"), ("version", "version 7"), ("truncated", "header says 61 tokens")])
def test_a_corrupt_shard_is_one_error_naming_the_file(shards, how, says):
    path = shards / "fineweb_train_000002.bin"
    corrupt(path, how)
    dm = FineWebDataModule(str(shards), seq_len=10, val_seq_len=8, val_tokens=64)
    for step in (dm.prepare_data, dm.setup):  # setup checks again: under DDP prepare_data runs on one rank
        with pytest.raises(DataError) as error:
            step()
        message = str(error.value)
        assert str(path) in message and says in message and "\n" not in message


def test_a_file_shorter_than_the_header_is_a_clear_error(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="shorter than the 1024-byte header"):
        read_header(path)


def test_missing_shards_name_the_folder_and_the_download_command(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        FineWebDataModule(str(missing)).prepare_data()
    message = str(error.value)
    assert str(missing) in message and "fineweb_train_*.bin" in message and "\n" not in message
    assert f"python -m lipschitz_lightning.data.fineweb --num-shards N --dir {missing}" in message
    assert "data.dir" in message and "paths.data_dir" in message
    assert not missing.exists()  # nothing downloaded or created at training time


def test_missing_val_shard_is_named(shards):
    (shards / "fineweb_val_000000.bin").unlink()
    with pytest.raises(DataError, match=r"fineweb_val_\*\.bin"):
        FineWebDataModule(str(shards)).prepare_data()


# ----------------------------------------------------------------------------- training stream


def test_sequences_stay_inside_shards_in_order_and_targets_are_shifted(shards):
    dm = datamodule(shards)
    train = dm.splits["train"]
    assert len(train) == (101 - 1) // 10 + (61 - 1) // 10 == 16
    x, y = train[torch.arange(16)]
    assert x.dtype == torch.int64 and x.shape == y.shape == (16, 10)
    assert torch.equal(y[:, :-1], x[:, 1:])
    starts = [1000 + 10 * i for i in range(10)] + [2000 + 10 * i for i in range(6)]
    assert x[:, 0].tolist() == starts  # shard 2 starts its own sequences: none straddles the boundary
    assert y[9, -1] == 1100 and y[15, -1] == 2060  # the last target token of each shard is used


def test_micro_batches_take_consecutive_sequences_and_wrap_around(shards):
    dm = datamodule(shards, batch_size=3)
    batches = first_batches(dm, 7)
    starts = [x[:, 0].tolist() for x, _ in batches]
    sequence_starts = [1000 + 10 * i for i in range(10)] + [2000 + 10 * i for i in range(6)]
    expected = [sequence_starts[i % 16] for i in range(21)]
    assert sum(starts, []) == expected  # 16 sequences, then the stream starts over
    assert starts[5] == [2050, 1000, 1010]


def test_resume_at_global_step_k_yields_the_uninterrupted_batches(shards):
    whole = first_batches(datamodule(shards, stand_in_trainer()), 12)
    for step, accumulate in ((5, 1), (3, 2)):
        resumed = datamodule(shards, stand_in_trainer(global_step=step, accumulate=accumulate))
        k = step * accumulate
        for (x, y), (rx, ry) in zip(whole[k:], first_batches(resumed, 12 - k)):
            assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("global_step", [0, 7])
def test_two_ranks_split_exactly_what_one_process_with_twice_the_batch_sees(shards, global_step):
    single = first_batches(datamodule(shards, stand_in_trainer(global_step), batch_size=4), 5)
    ranks = [first_batches(datamodule(shards, stand_in_trainer(global_step, rank=r, world_size=2)), 5) for r in (0, 1)]
    for m in range(5):
        (x0, y0), (x1, y1) = ranks[0][m], ranks[1][m]
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())  # disjoint
        assert torch.equal(torch.cat([x0, x1]), single[m][0]) and torch.equal(torch.cat([y0, y1]), single[m][1])


def test_a_token_outside_the_vocabulary_names_the_shard(shards):
    dm = datamodule(shards, vocab_size=1050)
    dm.splits["train"][torch.tensor([0])]  # tokens 1000..1010 fit
    with pytest.raises(DataError, match=r"fineweb_train_000001\.bin.*token 10\d\d.*data\.vocab_size=1050"):
        dm.splits["train"][torch.tensor([5])]


# ----------------------------------------------------------------------------- validation


def test_validation_sequences_and_their_split_over_ranks(shards):
    dm = datamodule(shards)  # 64 tokens in sequences of 8: 8 sequences
    batches = list(dm.val_dataloader())
    assert len(batches) == 8
    x, y = batches[3]
    assert x.shape == y.shape == (1, 8) and x.dtype == y.dtype == torch.int64
    assert x[0].tolist() == list(range(5024, 5032)) and y[0].tolist() == list(range(5025, 5033))
    assert batches[-1][1][0, -1] == 5064  # the one target token past val_tokens
    for world in (2, 3):
        per_rank = [list(datamodule(shards, stand_in_trainer(rank=r, world_size=world)).val_dataloader()) for r in range(world)]
        firsts = [[int(x[0, 0]) for x, _ in batches] for batches in per_rank]
        for r in range(world):
            assert firsts[r] == [5000 + 8 * i for i in range(r, 8, world)]  # rank r takes r, r + w, ...


def test_validation_reads_across_val_shards_in_order(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(10, 20))  # sorted after ..._000000
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    dm = datamodule(tmp_path, seq_len=4, val_seq_len=6, val_tokens=18)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    assert x.tolist() == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]


@pytest.mark.parametrize(
    ("overrides", "world", "says"),
    [
        ({"val_tokens": 88}, 1, r"data\.val_tokens must be at most 80 \(the val shards .* hold 81 tokens.*e\.g\. 80"),
        ({"val_tokens": 60}, 1, r"data\.val_tokens must be a multiple of data\.val_seq_len=8"),
        ({"val_tokens": 16}, 3, r"2 validation sequences must be at least the 3 ranks.*at least 24"),
        ({"seq_len": 101}, 1, r"data\.seq_len must be at most 100 \(the largest training shard .* holds 101 tokens"),
    ],
)
def test_config_that_does_not_fit_the_shards_is_one_error_naming_the_key(shards, overrides, world, says):
    with pytest.raises(ConfigError, match=says) as error:
        datamodule(shards, stand_in_trainer(world_size=world), **overrides)
    assert "\n" not in str(error.value)


def test_too_few_validation_sequences_for_a_later_world_fail_before_loading(shards):
    dm = datamodule(shards, val_tokens=16)
    dm.trainer = stand_in_trainer(rank=2, world_size=3)
    with pytest.raises(ConfigError, match="at least the 3 ranks"):
        dm.val_dataloader()


# ----------------------------------------------------------------------------- real shards, config


def test_real_gpt2_shards_of_tiny_shakespeare(shared_data_dir):
    directory = shared_data_dir / "tinyshakespeare-gpt2"
    seq_len = 1024
    dm = datamodule(directory, seq_len=seq_len, batch_size=4, val_seq_len=1024, val_tokens=35 * 1024)
    train = dm.splits["train"]
    assert sum(train.shards.lengths) == 301_970 and dm.splits["val"].shards.total == 36_061
    per_shard = [(n - 1) // seq_len for n in train.shards.lengths]
    assert len(train) == sum(per_shard)
    raw = [np.fromfile(p, dtype=np.uint16, offset=1024).astype(np.int64) for p in train.shards.paths]
    x, y = train[torch.tensor([0, 1, per_shard[0], per_shard[0] + 3])]
    assert x[0].tolist() == raw[0][:seq_len].tolist() and x[0, 0] == 50256  # the first document
    assert x[1].tolist() == raw[0][seq_len : 2 * seq_len].tolist()
    assert x[2].tolist() == raw[1][:seq_len].tolist()  # the second shard starts its own sequences
    assert y[3].tolist() == raw[1][3 * seq_len + 1 : 4 * seq_len + 1].tolist()
    assert int(x.max()) < 50257
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, seq_len) and torch.equal(xb, train[torch.arange(4)][0])
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert val.shape == (35, 1024) and val[0, 0] == 50256  # validation starts at a document
    documents = (val.flatten() == 50256).sum()
    assert 800 < documents <= 940  # most of the 940 val documents, each opened by 50256


def test_the_shipped_config_holds_the_recipe_and_builds(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=fineweb", f"paths.data_dir={tmp_path}"])
    data = cfg.data
    assert data._target_ == "lipschitz_lightning.data.fineweb.FineWebDataModule"
    assert (data.seq_len, data.batch_size, data.val_seq_len, data.val_tokens, data.vocab_size) == (49152, 1, 262144, 10485760, 50257)
    assert data.dir == f"{tmp_path}/fineweb10B"
    assert data.val_tokens % data.val_seq_len == 0 and (data.val_tokens // data.val_seq_len) % 8 == 0
    from hydra.utils import instantiate

    dm = instantiate(data)
    assert isinstance(dm, FineWebDataModule) and dm.kind == "tokens" and dm.vocab is None and dm.vocab_size == 50257
    with pytest.raises(DataError, match="--num-shards N"):
        dm.prepare_data()


# ----------------------------------------------------------------------------- downloader


def test_downloader_requests_the_val_shard_and_the_first_n_train_shards(tmp_path, monkeypatch, capsys):
    requests = []

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        requests.append((repo_id, filename, repo_type, local_dir))
        return str(write_shard(Path(local_dir) / filename, [50256, 1, 2]))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    target = tmp_path / "fineweb10B"
    write_shard(target / "fineweb_train_000002.bin", [50256, 9])  # already there: not fetched again
    fineweb.main(["--num-shards", "3", "--dir", str(target)])
    names = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000003.bin"]
    assert requests == [("kjj0/fineweb10B-gpt2", name, "dataset", str(target)) for name in names]
    assert "data.dir=" in capsys.readouterr().out
    requests.clear()
    monkeypatch.setenv("LIPSCHITZ_DATA_DIR", str(tmp_path / "elsewhere"))
    fineweb.main(["--num-shards", "1"])
    assert [(r[1], r[3]) for r in requests] == [(n, str(tmp_path / "elsewhere" / "fineweb10B")) for n in names[:2]]


def test_downloader_rejects_a_shard_count_the_hub_does_not_have(tmp_path):
    with pytest.raises(SystemExit):
        fineweb.main(["--num-shards", "104", "--dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        fineweb.main(["--dir", str(tmp_path)])  # --num-shards is required: no accidental 20 GB download


def test_a_failed_download_is_one_line_with_the_fixes(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise OSError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as exit_:
        fineweb.main(["--num-shards", "1", "--dir", str(tmp_path)])
    message = str(exit_.value.code)
    assert "fineweb_val_000000.bin" in message and "network" in message and str(tmp_path) in message
    assert "\n" not in message


def test_pickled_shards_map_the_files_again_instead_of_copying_them(shards):
    import pickle

    dm = datamodule(shards)
    train = dm.splits["train"]
    expected = train[torch.tensor([3, 12])]
    copy = pickle.loads(pickle.dumps(train))
    assert all(m is None for m in copy.shards._maps)
    assert all(torch.equal(a, b) for a, b in zip(copy[torch.tensor([3, 12])], expected))
