"""The search (commands/search.py, Hydra's sweeper for +hparams_search) on Optuna's ask-and-tell API:
its schema, its space, its failures, its resume, each through train.py's own app in this process;
trained runs replaced by a stand-in, so each test takes seconds. The real thing, 20-step runs in a
subprocess, is tests/test_certified_training.py's three-trial study."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lipschitz_lightning import train as train_py
from lipschitz_lightning.commands import report, search, studies
from lipschitz_lightning.commands import train as training
from lipschitz_lightning.errors import ConfigError, Preempted, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def arguments(tiny_cifar: Path, log_dir: Path, *extra: str) -> list[str]:
    return ["+hparams_search=muon_spectral_soft_cap", f"paths.data_dir={tiny_cifar}", f"paths.cache_dir={tiny_cifar / 'cache'}",
            f"paths.log_dir={log_dir}", "data.holdout=64", "trainer.max_steps=20", *extra]


FOLDER = Path("cifar_frontier") / "searches" / "muon_spectral_soft_cap"


def run_search(args: list[str], log_dir: Path, exit_status: int | None = None) -> list[search.TrialResult]:
    """``python train.py <args>`` in this process (Hydra's app, the sweeper, the launcher, the job):
    the trials that ran, in order, read back from the study; with ``exit_status``, the process's exit."""
    if exit_status is None:
        train_py.run(list(args))
    else:
        with pytest.raises(SystemExit) as exit_:
            train_py.run(list(args))
        assert exit_.value.code == exit_status
    return studies.load(studies.default_storage(log_dir / FOLDER), "muon_spectral_soft_cap").trials


class StandIn:
    """``build`` and ``train`` of commands/train.py, without training: a trial's objectives follow
    from its learning rate; ``fail`` maps a call's index to what that call raises or leaves out."""

    def __init__(self, monkeypatch, fail: dict[int, object] | None = None):
        self.calls, self.configs, self.fail = 0, [], fail or {}
        monkeypatch.setattr(training, "build", self.build)
        monkeypatch.setattr(training, "train", self.train)

    def build(self, cfg, checked=False):
        index = self.calls
        self.calls += 1
        self.configs.append(cfg)
        if isinstance(self.fail.get(index), BaseException):
            raise self.fail[index]
        return index

    def train(self, cfg, index):
        lr, w_max = float(cfg.optimizer.lr), float(cfg.constraint.w_max)
        summary = {"status": "completed", "step": int(cfg.trainer.max_steps), "val/acc": lr, "test/acc": lr / 2,
                   "lipschitz/bound": w_max ** 3, "lipschitz/log10_bound": math.log10(w_max ** 3), "output_dir": str(cfg.paths.output_dir)}
        if self.fail.get(index) == "no bound":
            del summary["lipschitz/log10_bound"]
        Path(cfg.paths.output_dir, "summary.json").write_text(json.dumps(summary))
        return summary


def test_a_failed_trial_is_told_fail_the_search_goes_on_and_a_resume_runs_what_is_missing(tiny_cifar, tmp_path, monkeypatch):
    args = arguments(tiny_cifar, tmp_path, "search.trials=4")
    stand_in = StandIn(monkeypatch, fail={1: TrainingDiverged("the loss is nan at step 3"), 2: "no bound"})
    trials = run_search(args, tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    folder = tmp_path / FOLDER
    assert "TrainingDiverged: the loss is nan at step 3" in trials[1].user_attrs["error"]
    assert trials[2].user_attrs["error"] == "summary.json has no finite lipschitz/log10_bound"
    # the study holds the objectives and, beside them, where each run is and its test accuracy
    first = trials[0]
    assert first.values == [first.params["optimizer.lr"], pytest.approx(3 * math.log10(first.params["constraint.w_max"]))]
    assert first.user_attrs["run_dir"] == str(folder / "trial-000") and first.user_attrs["test/acc"] == first.params["optimizer.lr"] / 2
    assert first.user_attrs["trainer.max_steps"] == "20"  # fixed on the command line: out of the space
    # each trial a run directory as a grid's run (Hydra's launcher made it): its summary (the failed
    # one's too), its log, its overrides
    failed = json.loads((folder / "trial-001" / "summary.json").read_text())
    assert failed["status"] == "failed" and "TrainingDiverged" in failed["error"]
    overrides = OmegaConf.load(folder / "trial-000" / ".hydra" / "overrides.yaml")
    assert overrides[0] == "+hparams_search=muon_spectral_soft_cap" and f"optimizer.lr={first.params['optimizer.lr']!r}" in overrides
    search_log = (folder / "search.log").read_text()
    assert "trial 0 (trial-000): " in search_log and "trial 1 failed: TrainingDiverged" in search_log
    assert json.loads((folder / "study.json").read_text())["study_name"] == "muon_spectral_soft_cap"

    # the same command again: the two failed trials are the two it lacks
    StandIn(monkeypatch)
    trials = run_search(args, tmp_path)
    assert [t.state.name for t in trials[4:]] == ["COMPLETE", "COMPLETE"] and len(trials) == 6
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{n:03d}" for n in range(6)]
    assert [c.trainer.max_steps for c in stand_in.configs] == [20] * 4


def test_a_resumed_search_draws_what_an_unbroken_one_would(tiny_cifar, tmp_path, monkeypatch):
    StandIn(monkeypatch)
    unbroken = run_search(arguments(tiny_cifar, tmp_path / "a", "search.trials=3"), tmp_path / "a")
    run_search(arguments(tiny_cifar, tmp_path / "b", "search.trials=2"), tmp_path / "b")
    resumed = run_search(arguments(tiny_cifar, tmp_path / "b", "search.trials=3"), tmp_path / "b")
    assert len(unbroken) == 3 and len(resumed) == 3 and unbroken[2].params == resumed[2].params
    assert len({t.params["optimizer.lr"] for t in resumed}) == 3


def test_the_search_stops_once_more_trials_failed_than_its_failure_rate_allows(tiny_cifar, tmp_path, monkeypatch):
    StandIn(monkeypatch, fail={i: TrainingDiverged("nan") for i in range(3)})
    trials = run_search(arguments(tiny_cifar, tmp_path, "search.trials=3"), tmp_path, exit_status=1)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert "2 of the 2 trials it ran failed, more than search.max_failure_rate 0.5 of the 3" in (tmp_path / FOLDER / "search.log").read_text()


def test_a_sigterm_tells_the_running_trial_fail_and_stops_the_search(tiny_cifar, tmp_path, monkeypatch):
    StandIn(monkeypatch, fail={0: Preempted("stopped by SIGTERM at step 7")})
    trials = run_search(arguments(tiny_cifar, tmp_path, "search.trials=3"), tmp_path, exit_status=143)
    assert [t.state.name for t in trials] == ["FAIL"] and trials[0].user_attrs["error"] == "interrupted"


def test_the_command_line_fixes_a_key_of_the_space_or_gives_it_another_range(tiny_cifar, tmp_path, monkeypatch):
    stand_in = StandIn(monkeypatch)
    args = arguments(tiny_cifar, tmp_path, "search.trials=2", "optimizer.lr=tag(log, interval(0.3, 0.4))", "constraint.w_max=2.5")
    plan = search.prepare(args)
    assert plan.space["optimizer.lr"].low == 0.3 and plan.space["optimizer.lr"].log and "constraint.w_max" not in plan.space
    assert plan.fixed == {"trainer.max_steps": "20", "constraint.w_max": "2.5"}
    run_search(args, tmp_path)
    assert len(stand_in.configs) == 2 and all(0.3 <= c.optimizer.lr <= 0.4 and c.constraint.w_max == 2.5 for c in stand_in.configs)


def test_a_search_on_several_devices_is_refused_in_one_line(tiny_cifar, tmp_path):
    # Lightning's DDP launcher starts every rank by running the command line again: the whole search
    with pytest.raises(ConfigError, match="a search runs its trials one after another in one process") as error:
        search.prepare(arguments(tiny_cifar, tmp_path, "trainer=ddp"))
    assert "\n" not in str(error.value) and not (tmp_path / "cifar_frontier").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ("search.trials=0", "search.trials must be an integer >= 1, got 0"),
    ("search.directions=[maximize]", "search.directions must give one direction per objective (2: val/acc, lipschitz/log10_bound), got 1"),
    ("search.objectives=[test/acc,val/acc]", "search.objectives.0 must be one of"),
    ("+search.params.foo=5", "search.params.foo must be a range, choice(a, b, ...), interval(low, high)"),
    ("optimizer.lr=tag(log, interval(0, 1))", "search.params.optimizer.lr must be a range"),
    ("constraint.w_max=interval(0.0, 2.0)", "constraint.w_max must be a number > 0, got 0.0"),  # a corner out of bounds
    ("optimizer.nonsense=interval(1, 2)", "optimizer.nonsense is not a setting of optimizer=muon"),
    ("search.sampler._target_=os.system", "search.sampler._target_ must be a sampler of optuna.samplers, got 'os.system'"),
    ("search.sampler.population_size=1", "search.sampler (optuna.samplers.NSGAIISampler): `population_size` must be greater than or equal to 2"),
])
def test_a_mistake_in_a_search_is_one_line_before_the_study_opens(tiny_cifar, tmp_path, extra, message):
    with pytest.raises(ConfigError) as error:
        search.open_study(search.prepare(arguments(tiny_cifar, tmp_path, extra)))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cifar_frontier").exists()


def test_a_study_of_other_directions_is_refused_not_silently_reused(tiny_cifar, tmp_path):
    search.open_study(search.prepare(arguments(tiny_cifar, tmp_path)))
    folder = tmp_path / "cifar_frontier" / "searches" / "muon_spectral_soft_cap"
    with pytest.raises(ConfigError, match="asks for val/acc, val/certified_acc maximize, maximize: give it another search.study_name"):
        search.open_study(search.prepare(arguments(tiny_cifar, tmp_path, "search.objectives=[val/acc,val/certified_acc]",
                                                   "search.directions=[maximize,maximize]", f"search.dir={folder}")))


def test_each_kind_of_range_is_the_optuna_distribution_it_says():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = search.search_space({
        "a": "choice(1000, 2000, 4000)", "b": "interval(1.0, 8.0)", "c": "tag(log, interval(0.05, 0.8))", "d": "interval(1, 5)",
        "e": "range(1, 10, 3)", "f": "tag(log, range(1, 9))", "g": "range(0.0, 1.0, 0.25)", "h": "choice(adamw, 'a b', true)",
    })
    assert space == {
        "a": CategoricalDistribution([1000, 2000, 4000]), "b": FloatDistribution(1.0, 8.0), "c": FloatDistribution(0.05, 0.8, log=True),
        "d": FloatDistribution(1.0, 5.0),  # Hydra reads an interval's ends as floats
        "e": IntDistribution(1, 7, step=3), "f": IntDistribution(1, 8, log=True),  # Hydra's range leaves out its stop
        "g": FloatDistribution(0.0, 0.75, step=0.25), "h": CategoricalDistribution(["adamw", "a b", True]),
    }
    assert search.corners(space)[0]["c"] == 0.05 and search.corners(space)[1]["a"] == 4000
    # what a trial draws goes back to Hydra as the same value
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for value in ("adamw", "a b", "it's", None, True, 0.1 + 0.2, 1e-05, 4000):
        (parsed,) = OverridesParser.create().parse_overrides([search.override("k", value)])
        assert parsed.value() == value


def test_train_py_runs_a_search_only_when_asked_and_leaves_hydra_its_flags(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train.py", "+hparams_search=certified", f"paths.log_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: search.study_name must be given")
    assert len(result.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
    result = subprocess.run([sys.executable, "train.py", "+hparams_search=[muon_spectral_soft_cap,certified]", "--cfg", "job"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = OmegaConf.create(result.stdout).search
    assert printed.study_name == "muon_spectral_soft_cap" and list(printed.objectives) == ["val/acc", "val/certified_acc"]


# ----------------------------------------------------------------------------- the report's first hour


def _rows(grid: bool, searched: bool) -> list[report.RunRow]:
    rows = []
    if grid:
        rows += [report.RunRow(run=f"grid/{i}", status="completed", pair=f"muon + {c}", optimizer="muon", constraint=c, val_acc=a, bound=b)
                 for i, (c, a, b) in enumerate([("spectral_soft_cap", 0.5, 8.0), ("spectral_soft_cap", 0.56, 60.0), ("weight_decay", 0.55, 300.0)])]
    if searched:
        rows.append(report.RunRow(run="s/trial-000", status="completed", source="study", pair="muon + spectral_soft_cap", optimizer="muon",
                                  constraint="spectral_soft_cap", val_acc=0.61, test_acc=0.55, bound=7.0))
    report.mark_frontiers(rows)
    return rows


@pytest.mark.parametrize(("grid", "searched", "title"), [
    (True, False, "each pair's Pareto frontier (grid)"),
    (False, True, "each pair's Pareto frontier (searched)"),
    (True, True, "each pair's Pareto frontier, grid (thin) and searched (thick)"),
])
def test_the_plot_s_title_and_legend_say_what_is_drawn_and_what_its_lines_mean(tmp_path, grid, searched, title):
    axes = report.plot(_rows(grid, searched), tmp_path / "tradeoff.png").axes[0]
    assert axes.get_title().endswith(title)
    legend = {text.get_text(): handle for text, handle in zip(axes.get_legend().get_texts(), axes.get_legend().legend_handles)}
    lines = {label: handle.get_linestyle() for label, handle in legend.items() if "frontier" in label}
    if grid:
        assert lines["grid frontier: spectral_soft_cap"] == "-" and lines["grid frontier: weight_decay"] == ":"
        assert legend["grid frontier: weight_decay"].get_linewidth() < 2
    if searched:
        assert legend["searched frontier (hollow points: its trials)"].get_linewidth() > 2
        assert "muon + spectral_soft_cap (searched)" in legend
    assert grid == any(label.startswith("grid frontier") for label in lines)
    assert searched == any(label.startswith("searched frontier") for label in lines)


def test_the_table_gives_held_out_validation_its_own_column_and_test_accuracy_its_own(tmp_path):
    table = report.markdown(_rows(True, True))
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert "val acc" not in header and "(test)" not in table
    test, held_out = header.index("test acc"), header.index("held-out val acc")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("| ")]
    (searched,) = [cells for cells in rows if cells[0] == "study"]
    assert searched[test] == "55.00%" and searched[held_out] == "61.00%"  # the test split, then what the search tuned on
    (grid,) = [cells for cells in rows if cells[0] == "grid" and cells[header.index("certified bound")] == "8"]
    assert grid[test] == "50.00%" and grid[held_out] == "-"  # the grid validated on the test split: no held-out accuracy
    assert "held-out val acc: on the training images a run held out" in table
