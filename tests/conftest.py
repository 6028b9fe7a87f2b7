"""Shared test helpers: the paper code's reference values (``tests/fixtures/``), the data, tiny runs."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lipschitz_lightning.config.compose import register_resolvers
from lipschitz_lightning.data.fineweb import write_shard

register_resolvers()  # what train.py does before composing conf/: the tests compose it too


def shared_dir() -> Path:
    """The project's shared folder; ``LIPSCHITZ_SHARED_DIR`` overrides the checkout-relative default."""
    override = os.environ.get("LIPSCHITZ_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared"


def fixtures_path() -> Path:
    """The repository's own copy of the shared folder's ``reference/fixtures.json`` (tests/fixtures/README.md)."""
    return Path(__file__).resolve().parent / "fixtures" / "fixtures.json"


@lru_cache(maxsize=1)
def load_reference_fixtures() -> dict:
    """The paper code's reference values; a missing file fails the run rather than skipping tests."""
    path = fixtures_path()
    if not path.is_file():
        raise FileNotFoundError(f"reference fixtures not found at {path}; restore tests/fixtures/ from the repository")
    with path.open() as handle:
        return json.load(handle)


# The methods of the SPEC §6 table, written out rather than read from the package.
SPEC_METHODS = (
    "none",
    "spectral_normalize",
    "spectral_soft_cap",
    "spectral_hard_cap",
    "spectral_hammer",
    "spectral_weight_decay",
    "orthogonalize",
    "svd_cap",
)


@pytest.fixture(scope="module")
def single_torch_thread():
    # Tiny matrices: with several OpenMP threads a 10x24 matmul costs milliseconds of thread
    # hand-off (far worse on a busy machine), with one it costs microseconds.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrising needs the data at collection time, which a fixture cannot give: a test
    # argument named ``ref_<section>`` runs once per entry of that fixtures.json section.
    for name in metafunc.fixturenames:
        if name.startswith("ref_"):
            section = name[len("ref_"):]
            entries = load_reference_fixtures().get(section, [])
            metafunc.parametrize(name, entries, ids=[f"{section}{i}" for i in range(len(entries))])


@pytest.fixture(scope="session")
def reference_fixtures() -> dict:
    return load_reference_fixtures()


# ----------------------------------------------------------------------------- pipeline helpers

from lipschitz_lightning import CONF_DIR  # noqa: E402  (the tests compose the same configs)
QUIET_TRAINER = [
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def write_tiny_cifar(directory: Path, num_train: int = 256, num_test: int = 128, seed: int = 0) -> Path:
    """A learnable CIFAR-10 look-alike in the hub's parquet layout (PNG bytes, columns img/label)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    (directory / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 10, count)
        # the class sets the mean brightness of one colour channel, so a few steps can learn it
        images = rng.integers(0, 128, (count, 32, 32, 3), dtype=np.uint8)
        images[np.arange(count), :, :, labels % 3] += (labels * 12).astype(np.uint8)[:, None, None]
        table = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(im) for im in images], "label": labels.tolist()}, features=features
        )
        table.to_parquet(str(directory / "cifar10" / f"{split}.parquet"))
    return directory


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def make_config(tiny_cifar, tmp_path):
    """Compose ``conf/train.yaml`` for a tiny, quiet run in ``tmp_path`` plus the given overrides."""
    from hydra import compose, initialize_config_dir

    def compose_config(*overrides: str, output_dir: Path | None = None):
        base = [
            f"paths.data_dir={tiny_cifar}",
            f"paths.cache_dir={tiny_cifar / 'cache'}",
            f"paths.output_dir={output_dir or tmp_path / 'run'}",
            "data.batch_size=32",
            "data.val_batch_size=64",
            "model.net.width=32",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            *QUIET_TRAINER,
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return compose_config


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data: ``$LIPSCHITZ_DATA_DIR`` or ``../shared/data`` beside the checkout."""
    # absolute: a test may run a command from another folder (CI gives a relative $LIPSCHITZ_DATA_DIR)
    directory = Path(os.environ.get("LIPSCHITZ_DATA_DIR") or shared_dir() / "data").resolve()
    if not (directory / "cifar10" / "train.parquet").is_file():
        raise FileNotFoundError(f"CIFAR-10 parquet files not found under {directory}; set LIPSCHITZ_DATA_DIR")
    return directory


# ----------------------------------------------------------------------------- a tiny NanoGPT on generated shards

CARD = ["optimizer=muon", "constraint=spectral_hammer", "model=nanogpt"]
DOC = 0  # the tiny vocabulary's document token
VOCAB = 512


@pytest.fixture(scope="session")
def counting_shards(tmp_path_factory) -> Path:
    """Documents of counting sequences: after token t comes t + 1 (a pattern a few steps learn)."""
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for name, documents in (("fineweb_train_000001.bin", 400), ("fineweb_val_000000.bin", 40)):
        tokens = []
        for _ in range(documents):
            start, length = rng.integers(1, VOCAB - 64), rng.integers(20, 60)
            tokens += [DOC] + list(range(start, start + length))
        write_shard(directory / name, np.array(tokens, dtype=np.uint16))
    return directory


def tiny_nanogpt(shards: Path, *extra: str) -> list[str]:
    return [
        *CARD, f"data.dir={shards}", "data.seq_len=256", "data.val_seq_len=256", "data.val_tokens=1024", f"data.vocab_size={VOCAB}",
        f"model.net.vocab_size={VOCAB}", "model.net.num_blocks=2", "model.net.width=64", "model.net.num_heads=2",
        "model.net.window_pattern=LS", "model.net.window_max=256", f"model.net.document_token={DOC}",
        # the recipe's head lr (0.005) is tuned for 6200 steps; a few CPU steps need a faster head
        "optimizer.role_lr.head=0.05", "trainer.log_every_n_steps=1", *extra,
    ]




# ----------------------------------------------------------------------------- what the guarantees' tests share


class NormRecorder(Callback):
    """After every optimizer step of a run: every weight's exact norm (``net.layer_norms()``:
    RMS->RMS for matrices, the largest token RMS for an embedding)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(pl_module.net.layer_norms())

    def largest(self, exclude: tuple[str, ...] = ()) -> float:
        return max(value for step in self.history for name, value in step.items() if name not in exclude)


def ascend_ratio(ratio, a: torch.Tensor, b: torch.Tensor, *, steps: int, lr: float, project=None, project_b=None) -> float:
    """The largest ``ratio(a, b)`` (one value per pair) that Adam's gradient ascent finds from the
    pairs ``(a, b)``, each pair kept where ``project`` puts it (``b`` where ``project_b`` does, when
    given): the adversarial search every certificate test runs against its bound."""
    project = project or (lambda x: x)
    project_b = project_b or project
    a, b = project(a.detach().clone()).requires_grad_(True), project_b(b.detach().clone()).requires_grad_(True)
    search = torch.optim.Adam([a, b], lr=lr)
    best = 0.0
    for _ in range(steps):
        with torch.no_grad():
            a.copy_(project(a)), b.copy_(project_b(b))
        value = ratio(a, b)
        best = max(best, float(value.detach().max()))
        search.zero_grad()
        (-value.sum()).backward()
        search.step()
    return best
