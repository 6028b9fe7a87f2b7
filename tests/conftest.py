"""Shared test helpers: where the reference fixtures live (SPEC's shared/reference)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest


def shared_dir() -> Path:
    """The project's shared folder; ``LIPSCHITZ_SHARED_DIR`` overrides the checkout-relative default."""
    override = os.environ.get("LIPSCHITZ_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared"


def fixtures_path() -> Path:
    return shared_dir() / "reference" / "fixtures.json"


@lru_cache(maxsize=1)
def load_reference_fixtures() -> dict:
    """The paper code's reference values, or ``{}`` when the file is absent (tests then skip)."""
    path = fixtures_path()
    if not path.is_file():
        return {}
    with path.open() as handle:
        return json.load(handle)


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
    data = load_reference_fixtures()
    if not data:
        pytest.skip(f"reference fixtures not found at {fixtures_path()}")
    return data
