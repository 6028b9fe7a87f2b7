"""The front page stays a front page, and its tables say what conf/ holds."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the table's group -> the folder whose yaml files are its options
GROUPS = {
    "optimizer": "conf/optimizer", "constraint": "conf/constraint", "model": "conf/model", "data": "conf/data",
    "scheduler": "conf/scheduler", "trainer": "conf/trainer", "logger": "conf/logger", "experiment": "conf/experiment",
    "loss": "conf/loss", "+sweep": "sweeps/sweep", "+hparams_search": "sweeps/hparams_search",
}


def group_table(page: Path) -> dict[str, set[str]]:
    rows = re.findall(r"^\| `([+\w]+)` \| (.*) \|$", page.read_text(), flags=re.M)
    # an option is a backticked name at the start of the cell or after a comma (not inside a parenthesis)
    return {group: set(re.findall(r"(?:^|, )`([\w]+)`", re.sub(r"\([^)]*\)", "", cell))) for group, cell in rows if group in GROUPS}


def test_the_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_the_group_tables_list_every_option_conf_has():
    for page in (REPO / "README.md", REPO / "docs" / "configuration.md"):
        table = group_table(page)
        assert set(table) == set(GROUPS), page
        for group, folder in GROUPS.items():
            options = {path.stem for path in (REPO / folder).glob("*.yaml")}
            assert table[group] == options, f"{page.name}: {group}: the table has {sorted(table[group])}, {folder} has {sorted(options)}"


def test_every_page_the_readme_links_exists():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links {target}"


def test_the_python_api_page_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    gpt, certificate = namespace["gpt"], namespace["certificate"]
    assert certificate.bound == gpt.certified_bound() and math.isfinite(namespace["loss"].item())
    assert max(gpt.layer_norms().values()) <= 2.0 * (1 + 1e-4)  # the constraint held the GPT in its ball


def test_the_python_api_still_imports_from_where_it_always_was():
    from lipschitz_lightning import constraints, lipschitz
    from lipschitz_lightning.core import bounds, constraints as core_constraints

    for name in ("project_linear", "soft_cap", "soft_cap_coupling", "svd_cap", "orthogonalize", "hard_cap",
                 "spectral_normalize", "spectral_hammer", "spectral_weight_decay", "project_stack"):
        assert getattr(constraints, name) is getattr(core_constraints, name), name
    for name in ("rms_norm", "mlp_bound", "gpt_certificate", "gpt_bound_paper_formula"):
        assert getattr(lipschitz, name) is getattr(bounds, name), name
    # the two modules list their API (no star import): every public name of core.constraints and
    # core.bounds is in it, so a new constraint or bound is not forgotten there
    for api, module in ((constraints, core_constraints), (lipschitz, bounds)):
        defined = {name for name, value in vars(module).items() if not name.startswith("_")
                   and getattr(value, "__module__", module.__name__) == module.__name__ and not inspect.ismodule(value)}
        assert defined <= set(api.__all__), sorted(defined - set(api.__all__))
        assert all(hasattr(api, name) for name in api.__all__)


def test_every_guarantee_in_the_constraints_table_names_tests_that_exist():
    page = (REPO / "docs" / "constraints.md").read_text()
    table = page[page.index("## What holds after every step"):page.index("## The soft cap's proof")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py")), flags=re.M))
    methods = {path.stem for path in (REPO / "conf" / "constraint").glob("*.yaml")}
    covered = set()
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row.split(" | ")[-1])
        assert named, row
        assert set(named) <= defined, f"{row[:60]}...: no such test {sorted(set(named) - defined)}"
        covered |= set(re.findall(r"`(\w+)`", row.split(" | ")[0]))
    assert methods <= covered, f"no row for {sorted(methods - covered)}"


def test_the_lightning_page_constrains_and_certifies_a_users_module_as_written(tmp_path, monkeypatch):
    from lipschitz_lightning.core.bounds import rms_norm
    from lipschitz_lightning.models.protocol import PlainNetwork

    monkeypatch.chdir(tmp_path)  # Lightning's default logger and checkpoints write into the working folder
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "lightning.md").read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/lightning.md", "exec"), namespace)
    net, report = namespace["model"].net, namespace["report"]
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert max(rms_norm(m.weight) for m in linear) <= 1.0 * (1 + 1e-5)  # w_max 1 after the last step
    assert report.bound_l2 == pytest.approx(float(PlainNetwork(net).logit_l2_bound()), rel=1e-9)
    print(f"\nclean {report.clean:.3f}, certified {report.certified:.3f}, attacked {report.attacked:.3f} at l2 0.05")
    assert report.clean > 0.5 and 0 < report.certified <= report.attacked <= report.clean
