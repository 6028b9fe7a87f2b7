"""The repository carries the paper code's reference values itself (tests/fixtures/README.md);
where the project's shared folder exists, the carried copy is its ``reference/fixtures.json``."""

from __future__ import annotations

import pytest

from conftest import fixtures_path, load_reference_fixtures, shared_dir


def test_the_fixtures_are_carried_by_the_repository():
    assert fixtures_path().is_file() and (fixtures_path().parent / "README.md").is_file()
    sections = {"matrix_functions", "linear_project", "soft_cap_coupling", "embed", "dualize", "transformer_bound", "mlp_bound"}
    assert sections <= set(load_reference_fixtures())


def test_the_carried_fixtures_are_the_shared_ones_byte_for_byte():
    shared = shared_dir() / "reference" / "fixtures.json"
    if not shared.is_file():
        pytest.skip(f"no shared folder at {shared.parent} (a clone of the public repository)")
    assert fixtures_path().read_bytes() == shared.read_bytes(), (
        f"tests/fixtures/fixtures.json differs from {shared}: copy it (tests/fixtures/README.md)"
    )
