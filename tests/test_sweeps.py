"""Hydra multirun sweeps (sweeps/), the report that gathers them, and W&B tags and groups."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lipschitz_lightning.commands import report
from lipschitz_lightning.config.tradeoff import constraint_name, describe

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "data.batch_size=32",
    "data.val_batch_size=64",
    "model.net.width=32",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def multirun(tmp_path: Path, data_dir: Path, *overrides: str, env: dict | None = None) -> Path:
    """Run ``train.py`` as a Hydra multirun into ``tmp_path``; return its sweep directory."""
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"paths.data_dir={data_dir}", f"paths.cache_dir={data_dir / 'cache'}",
         f"paths.log_dir={tmp_path}", *TINY_RUN],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = {p.parent for p in tmp_path.rglob("multirun.yaml")}
    return sweep_dir


@pytest.fixture(scope="module")
def smoke_sweep(tiny_cifar, tmp_path_factory) -> Path:
    """The smoke grid cut to 2 pairs x 2 levels, logging to W&B offline."""
    return multirun(
        tmp_path_factory.mktemp("smoke"), tiny_cifar,
        "+sweep=smoke", "+pair=adamw_spectral_normalize,muon_spectral_soft_cap", "logger=wandb",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )


@pytest.mark.slow
def test_every_run_of_the_multirun_writes_a_summary(smoke_sweep):
    summaries = [json.loads(p.read_text()) for p in sorted(smoke_sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    grid = {(s["config"]["optimizer"]["_target_"].rsplit(".", 1)[-1], s["config"]["constraint"]["w_max"]) for s in summaries}
    assert grid == {("AdamW", 4.0), ("AdamW", 1.0), ("Muon", 4.0), ("Muon", 1.0)}
    for s in summaries:
        assert s["status"] == "completed" and s["step"] == 3
        assert {"val/acc", "val/loss", "lipschitz/bound", "wall_time_s", "norm/layers.0"} <= s.keys()
        assert constraint_name(s["config"]["constraint"]) in ("spectral_normalize", "spectral_soft_cap")


def test_report_builds_the_table_and_a_plot_with_one_point_per_run(smoke_sweep, tmp_path, capsys):
    assert report.main([str(smoke_sweep), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| muon + spectral_soft_cap | 4 |" in printed and "4 completed, 0 failed" in printed
    with (tmp_path / "tradeoff.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["pair"] for r in rows} == {"adamw + spectral_normalize", "muon + spectral_soft_cap"}
    image = Image.open(tmp_path / "tradeoff.png")
    image.load()  # decodes
    assert image.size[0] > 300 and image.size[1] > 200
    figure = report.plot(report.collect([smoke_sweep]), tmp_path / "again.png")
    points = sum(len(c.get_offsets()) for c in figure.axes[0].collections)
    assert points == 4


def test_wandb_runs_are_tagged_and_grouped_by_sweep(smoke_sweep):
    from test_training import wandb_records

    run_files = sorted(smoke_sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 4
    groups = set()
    for run_file in run_files:
        records = list(wandb_records(run_file))
        (run,) = [r.run for r in records if r.HasField("run")][:1]
        groups.add(run.run_group)
        tags = set(run.tags)
        assert {"smoke", "constraint:spectral_normalize", "constraint:spectral_soft_cap"} & tags
        assert any(t.startswith("optimizer:") for t in tags) and any(t.startswith("w_max:") for t in tags)
        logged = {item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item}
        assert {"val/acc", "val/loss", "lipschitz/bound"} <= logged
        # the run summary (last values) is what a W&B scatter panel of bound vs accuracy plots
        summary = {item.key or "/".join(item.nested_key) for r in records if r.HasField("summary") for item in r.summary.update}
        assert {"val/acc", "lipschitz/bound"} <= summary
    assert groups == {f"smoke/{smoke_sweep.name}"}


@pytest.mark.slow
def test_a_failed_run_is_listed_not_dropped(tiny_cifar, tmp_path):
    sweep_dir = multirun(
        tmp_path, tiny_cifar, "+sweep=smoke", "+pair=muon_spectral_soft_cap", "tradeoff.level=0",
        # final_scale=nan is refused as a setting now; a finite scale past float32's range overflows the logits
        "model.net.zero_init=false", "model.net.final_scale=1.0,1e39",
    )
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/summary.json"))
    assert statuses == ["completed", "failed"]
    rows = report.collect([sweep_dir])
    (failed,) = [r for r in rows if r.status == "failed"]
    assert "TrainingDiverged" in failed.error and "step 0" in failed.error
    table = report.markdown(rows)
    assert "1 completed, 1 failed or incomplete" in table and "- failed:" in table


def test_a_run_without_summary_is_reported_incomplete(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text(
        "optimizer: {_target_: lipschitz_lightning.optim.Muon, lr: 0.2, weight_decay: 0.0}\n"
        "constraint: {method: spectral_soft_cap, w_max: 2.0}\n"
    )
    (row,) = report.collect([tmp_path])
    assert row.status == "incomplete" and row.pair == "muon + spectral_soft_cap" and row.w_max == 2.0


def finished_runs(folder: Path, *accuracies: float) -> Path:
    """A sweep folder whose runs finished: one ``summary.json`` each, as a grid's runs write them."""
    for job, accuracy in enumerate(accuracies):
        (folder / str(job)).mkdir(parents=True, exist_ok=True)
        (folder / str(job) / "summary.json").write_text(json.dumps({
            "status": "completed", "step": 3, "val/acc": accuracy, "val/loss": 1.5, "lipschitz/bound": 10.0 * (job + 1),
            "config": {"optimizer": {"_target_": "lipschitz_lightning.optim.Muon", "lr": 0.2, "weight_decay": 0.0},
                       "constraint": {"_target_": "lipschitz_lightning.core.constraints.SpectralSoftCap", "w_max": 2.0 + job}},
        }))
    return folder


def test_the_report_of_several_folders_asks_where_it_goes_and_writes_nothing(tmp_path, capsys):
    grid, search = finished_runs(tmp_path / "grid", 0.5, 0.6), finished_runs(tmp_path / "search", 0.55)
    assert report.main([str(grid)]) == 0
    grid_report = (grid / "tradeoff.csv").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        report.main([str(grid), str(search)])  # issue 28: this replaced the grid's tradeoff.* without a word
    assert exit_status.value.code == 1
    assert capsys.readouterr().err == "error: 2 directories make one report: say where it goes with --out DIR (see --help)\n"
    assert (grid / "tradeoff.csv").read_bytes() == grid_report and not list(search.glob("tradeoff.*"))
    assert report.main([str(grid), str(search), "--out", str(tmp_path / "both")]) == 0
    assert f"wrote {tmp_path / 'both' / 'tradeoff.csv'}" in capsys.readouterr().out
    with (tmp_path / "both" / "tradeoff.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (grid / "tradeoff.csv").read_bytes() == grid_report


def test_an_earlier_report_is_replaced_only_with_force(tmp_path, capsys):
    grid = finished_runs(tmp_path / "grid", 0.5)
    assert report.main([str(grid)]) == 0
    assert "(replacing" not in capsys.readouterr().out
    earlier = {path.name: path.read_bytes() for path in grid.glob("tradeoff.*")}
    assert set(earlier) == {"tradeoff.csv", "tradeoff.md", "tradeoff.png"}
    finished_runs(grid, *[0.5] * 2)  # job 1 finished since
    with pytest.raises(SystemExit):
        report.main([str(grid)])
    assert capsys.readouterr().err == (f"error: {grid} already holds a report (tradeoff.csv, tradeoff.md, tradeoff.png): "
                                       "--force replaces it, --out DIR writes one elsewhere (see --help)\n")
    assert {path.name: path.read_bytes() for path in grid.glob("tradeoff.*")} == earlier
    assert report.main([str(grid), "--force"]) == 0
    assert f"wrote {grid / 'tradeoff.csv'}, {grid / 'tradeoff.md'}, {grid / 'tradeoff.png'} (replacing the earlier report)" in capsys.readouterr().out
    with (grid / "tradeoff.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_pareto_frontier_keeps_only_undominated_points():
    points = [(1.0, 0.30), (2.0, 0.50), (3.0, 0.45), (4.0, 0.55), (4.0, 0.52), (0.5, 0.10)]
    assert report.pareto_frontier(points) == [5, 0, 1, 3]


@pytest.mark.parametrize("sweep", ["smoke", "cifar_tradeoff", "cifar_tradeoff_loss", "shakespeare_tradeoff"])
@pytest.mark.slow
def test_every_grid_point_of_every_sweep_composes_and_validates(sweep):
    """Each (pair, level) of a shipped sweep resolves to a config that passes validation."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lipschitz_lightning.config.settings import validate_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
        params = base.hydra.sweeper.params
        pairs, levels = params["+pair"].split(","), params["tradeoff.level"].split(",")
        assert len(pairs) * len(levels) >= (4 if sweep == "smoke" else 24)
        for pair in pairs:
            for level in levels:
                cfg = compose("train", overrides=[f"+sweep={sweep}", f"+pair={pair}", f"tradeoff.level={level}", "paths.output_dir=unused"])
                validate_config(cfg)
                label = describe(OmegaConf.to_container(cfg, resolve=True))
                assert label.pair.replace(" + ", "_") == pair.replace("weight_decay", label.constraint)


def test_every_run_of_the_stability_grid_composes_with_its_learning_rate():
    """shakespeare_stability: 5 pairs x 5 learning rates 30x apart, each config valid."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lipschitz_lightning.config.settings import validate_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose("train", overrides=["+sweep=shakespeare_stability"], return_hydra_config=True)
        pairs, levels = base.hydra.sweeper.params["+stability"].split(","), base.hydra.sweeper.params["tradeoff.level"].split(",")
        assert len(pairs) >= 4 and len(levels) >= 5
        for pair in pairs:
            optimizer = pair.split("_")[0]
            lrs = []
            for level in levels:
                cfg = compose("train", overrides=["+sweep=shakespeare_stability", f"+stability={pair}", f"tradeoff.level={level}",
                                                  "paths.output_dir=unused"])
                validate_config(cfg)
                resolved = OmegaConf.to_container(cfg, resolve=True)
                lrs.append(resolved["optimizer"]["lr"])
                assert describe(resolved).optimizer == optimizer
                assert (resolved["model"]["net"]["logit_clip"] == 100.0) == pair.endswith("qk_clip")
            assert max(lrs) / min(lrs) >= 30 and lrs == sorted(lrs)


def test_slurm_launcher_config_composes():
    """The documented cluster launch: the sweep fanned out by hydra-submitit-launcher, one GPU per run."""
    from hydra import compose, initialize_config_dir

    overrides = ["+sweep=cifar_tradeoff", "hydra/launcher=slurm", "trainer=gpu", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.trainer.accelerator == "gpu"
