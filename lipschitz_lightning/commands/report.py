"""Gather sweeps' runs into one table and the paper's picture: certified bound vs accuracy.

    python -m lipschitz_lightning.report logs/cifar_tradeoff/multiruns/<date> [more dirs] [--out DIR]
    python -m lipschitz_lightning.report logs/cifar_tradeoff/multiruns/<date> logs/cifar_frontier/searches --out logs/cifar_frontier/report

Every run directory (one holding ``summary.json`` or Hydra's ``.hydra/``) is one row. Runs that
failed, diverged or never finished are rows too, with their status and error, and are listed
under the table rather than dropped. A run inside a search's folder (one holding ``study.json`` or
``study.db``: an Optuna search, sweeps/hparams_search/) is a searched trial: its pair's searched
frontier is drawn over the grid's, and the table says how many trials each study holds, by state
(read from the study through Optuna, ``commands/studies.py``). Accuracy is on the test images:
``test/acc`` for a run that validated on held-out training images, ``val/acc`` otherwise (there
validation is the test split); the held-out validation accuracy a search tunes on has a column of
its own. Writes ``tradeoff.csv``, ``tradeoff.md`` and ``tradeoff.png`` into ``--out`` and prints the
markdown and where the files went. ``--out`` defaults to the directory when one is given; several
need ``--out`` (their report is not the first one's). An earlier report there is replaced only with
``--force``: otherwise one line says so and nothing is written.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lipschitz_lightning.commands import stability, studies
from lipschitz_lightning.commands.extras import available, install_line, pyplot
from lipschitz_lightning.config.tradeoff import describe
from lipschitz_lightning.core.types import parse_radius
from lipschitz_lightning.errors import OneLineParser


@dataclass
class RunRow:
    run: str
    status: str  # completed, failed, incomplete
    source: str = "grid"  # grid, or the name of the search (Optuna study) the trial belongs to
    pair: str = ""
    optimizer: str = ""
    constraint: str = ""
    w_max: float | None = None
    weight_decay: float | None = None
    lr: float | None = None
    step: int | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    test_acc: float | None = None  # only where validation was held out of the training images
    certified_acc: float | None = None  # on the test images, at model.certified_radius
    temperature: float | None = None
    radius: float | None = None  # the certified-margin loss's training radius
    bound: float | None = None
    wall_time_s: float | None = None
    layer_norms: str = ""
    error: str = ""
    on_frontier: bool = field(default=False)

    @property
    def accuracy(self) -> float | None:
        """On the test images, whichever split validation was."""
        return self.test_acc if self.test_acc is not None else self.val_acc

    @property
    def searched(self) -> bool:
        return self.source != "grid"

    @property
    def plottable(self) -> bool:
        return (
            self.status == "completed"
            and self.accuracy is not None
            and self.bound is not None
            and math.isfinite(self.bound)
            and self.bound > 0
        )


def _run_dirs(root: Path) -> list[Path]:
    found = {path.parent for path in root.rglob("summary.json")}
    found |= {path.parent.parent for path in root.rglob(".hydra/config.yaml")}
    return sorted(found, key=lambda p: [int(part) if part.isdigit() else part for part in p.parts])


def _hydra_config(path: Path) -> dict:
    """The sections a label needs, resolved: Hydra stores the job's config with its interpolations
    (a sweep's knob is one), and only Hydra's own ``${hydra:...}`` cannot be resolved here."""
    if not path.is_file():
        return {}
    config = OmegaConf.load(path)
    return {key: OmegaConf.to_container(config[key], resolve=True) for key in ("optimizer", "constraint") if key in config}


def search_names(roots: list[Path]) -> dict[Path, str]:
    """Every search's folder under ``roots`` (resolved) -> the name its rows and its study's line
    carry: its study's name (the folder's, where no ``study.json`` writes it down), with the task's
    folder in front where two searches share a name (a pair's search and its certified variant)."""
    found = {path.parent.resolve() for root in roots for file in (studies.RECORD_FILE, studies.STUDY_FILE) for path in root.rglob(file)}
    records = {folder: studies.search_record(folder) for folder in sorted(found)}
    names = {folder: record.study_name or folder.name for folder, record in records.items() if record is not None}
    shared = {name for name in names.values() if list(names.values()).count(name) > 1}
    return {folder: f"{folder.parent.parent.name}/{name}" if name in shared else name for folder, name in names.items()}


def _study_of(directory: Path, root: Path, searches: dict[Path, str]) -> str:
    """The search a run belongs to: the nearest folder above it, up to ``root``, that holds a study."""
    root = root.resolve()
    for parent in directory.resolve().parents:
        if parent in searches:
            return searches[parent]
        if parent == root:
            break
    return "grid"


@dataclass
class StudyCount:
    study: str
    trials: dict[str, int]  # Optuna's trial states: COMPLETE, FAIL, RUNNING, ...
    error: str = ""  # why the study could not be read (its trials' rows are in the table all the same)


def study_counts(roots: list[Path]) -> list[StudyCount]:
    """Every search's study under ``roots`` and its trials by state, read through Optuna."""
    counts = []
    for folder, name in search_names(roots).items():
        record = studies.search_record(folder)
        if not available("optuna"):
            counts.append(StudyCount(name, {}, f"Optuna is not installed ({install_line('optuna')})"))
            continue
        try:
            counts.append(StudyCount(name, studies.trial_states(studies.load(record.storage, record.study_name))))
        except Exception as error:  # an old schema, a storage out of reach or its driver missing, a hidden password
            counts.append(StudyCount(name, {}, f"{studies.shown(record.storage)}: {' '.join(str(error).split())}"))
    return counts


def _read_run(directory: Path, root: Path, searches: dict[Path, str]) -> RunRow:
    name = str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        config = summary.get("config") or {}
    else:
        # killed, or still running: only Hydra's record of the composed config is there
        summary = {"status": "incomplete", "error": "no summary.json: the run was killed, crashed or is still running"}
        config = _hydra_config(directory / ".hydra" / "config.yaml")
    row = RunRow(run=name, status=summary.get("status", "completed"), source=_study_of(directory, root, searches), error=summary.get("error", ""))
    try:
        label = describe(config)
        row.pair, row.optimizer, row.constraint = label.pair, label.optimizer, label.constraint
        row.w_max, row.weight_decay, row.lr = label.w_max, label.weight_decay, label.lr
    except (KeyError, TypeError, ValueError, AttributeError):
        pass  # an unresolvable config (e.g. the run died composing it): the row keeps its status and error
    row.step = summary.get("step")
    row.val_acc, row.val_loss, row.test_acc = summary.get("val/acc"), summary.get("val/loss"), summary.get("test/acc")
    row.certified_acc = summary.get("test/certified_acc", None if row.test_acc is not None else summary.get("val/certified_acc"))
    loss = config.get("loss") or {}
    row.temperature, row.radius = loss.get("temperature"), _radius(loss.get("radius"))
    row.bound, row.wall_time_s = summary.get("lipschitz/bound"), summary.get("wall_time_s")
    row.layer_norms = " ".join(f"{k[len('norm/'):]}={v:.3g}" for k, v in summary.items() if k.startswith("norm/"))
    if row.status == "completed" and not row.plottable:
        row.status, row.error = "failed", row.error or "no finite accuracy and bound in summary.json"
    return row


def _radius(value) -> float | None:
    try:
        return None if value is None else parse_radius(value)
    except ValueError:
        return None


def collect(roots: list[Path]) -> list[RunRow]:
    rows, searches = [], search_names(roots)
    for root in roots:
        # with several sweeps, "0" alone would not say which sweep's job 0 a row is
        anchor = root.parent if len(roots) > 1 else root
        rows += [_read_run(directory, anchor, searches) for directory in _run_dirs(root)]
    mark_frontiers(rows)
    return rows


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats on both axes: lower bound, higher accuracy.

    Sorted by bound; ties in bound keep only the most accurate.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    frontier, best_accuracy = [], -math.inf
    for i in order:
        if points[i][1] > best_accuracy:
            frontier.append(i)
            best_accuracy = points[i][1]
    return frontier


def mark_frontiers(rows: list[RunRow]) -> None:
    """Each pair's Pareto points, the grid's and the search's apart."""
    by_pair = defaultdict(list)
    for row in rows:
        if row.plottable:
            by_pair[row.pair, row.searched].append(row)
    for members in by_pair.values():
        for i in pareto_frontier([(r.bound, r.accuracy) for r in members]):
            members[i].on_frontier = True


def write_csv(rows: list[RunRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0]).keys()) if rows else ["run"])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def markdown(rows: list[RunRow], study_counts: list[StudyCount] = ()) -> str:
    """One row per completed run, grid first, then each search; the Pareto points marked."""
    done = sorted((r for r in rows if r.plottable), key=lambda r: (r.searched, r.source, r.pair, r.bound))
    lines = [
        "| source | pair | w_max | wd | lr | loss T / radius | test acc | certified at 36/255 | held-out val acc | certified bound | Pareto | layer norms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in done:
        loss = "" if r.temperature is None else f"{r.temperature:.3g} / {_fmt(r.radius, '.3g') or 0}"
        held_out = _percent(r.val_acc) if r.test_acc is not None else "-"
        lines.append(
            f"| {r.source} | {r.pair} | {_fmt(r.w_max, '.3g')} | {_fmt(r.weight_decay, '.3g')} | {_fmt(r.lr, '.3g')} | {loss} | "
            f"{_percent(r.accuracy)} | {_percent(r.certified_acc)} | {held_out} | {r.bound:.4g} | {'yes' if r.on_frontier else ''} | "
            f"{r.layer_norms} |"
        )
    not_done = [r for r in rows if not r.plottable]
    lines.append("")
    if done:
        lines.append("test acc and certified: on the test images. held-out val acc: on the training images a run held "
                     "out (data.holdout), what a search tunes on; - where the run validated on the test images.")
    lines.append(f"{len(done)} completed, {len(not_done)} failed or incomplete.")
    pairs = defaultdict(set)
    for r in rows:
        if r.searched:
            pairs[r.source].add(r.pair)
    for study in study_counts:
        found = ", ".join(sorted(pairs[study.study])) or "no run found"
        if study.error:
            lines.append(f"- search {study.study} ({found}): its study was not read: {study.error}")
            continue
        states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(study.trials.items()))
        lines.append(f"- search {study.study} ({found}): {sum(study.trials.values())} trials ({states})")
    for r in not_done:
        where = f" at step {r.step}" if r.step is not None else ""
        lines.append(f"- {r.status}: {r.run} ({r.pair or 'config unreadable'}){where}: {r.error}")
    return "\n".join(lines)


OPTIMIZER_COLOURS = {"adamw": "tab:orange", "muon": "tab:blue"}
CONSTRAINT_MARKERS = {
    "none": "x",
    "weight_decay": "o",
    "spectral_normalize": "s",
    "spectral_soft_cap": "*",
    "spectral_hammer": "D",
    "spectral_hard_cap": "^",
    "spectral_weight_decay": "v",
    "orthogonalize": "P",
    "svd_cap": "h",
}
# the frontier lines of one optimizer's pairs share a colour, so the line style tells them apart
CONSTRAINT_LINESTYLES = {"weight_decay": ":", "spectral_normalize": "--", "spectral_hammer": "-.", "spectral_soft_cap": "-"}


def _title(grid: bool, searched: bool) -> str:
    """What the plot draws, and only that."""
    drawn = {(True, True): ", grid (thin) and searched (thick)", (True, False): " (grid)", (False, True): " (searched)"}
    return f"Lipschitz bound vs accuracy: each pair's Pareto frontier{drawn.get((grid, searched), '')}"


def _line_legend(styles: dict[str, str], searched: bool) -> list:
    """Legend entries for what the lines mean: a grid frontier's style is its constraint's (the
    colour is the optimizer's, as the points'); a searched frontier is thick and solid."""
    Line2D = pyplot().Line2D
    handles = [Line2D([], [], color="0.35", linestyle=style, linewidth=1.2, label=f"grid frontier: {constraint}")
               for constraint, style in styles.items()]
    if searched:
        handles.append(Line2D([], [], color="0.35", linewidth=2.4, label="searched frontier (hollow points: its trials)"))
    return handles


def plot(rows: list[RunRow], path: Path, title: str = ""):
    """Scatter every completed run, one frontier line per pair; return the figure (for tests).

    Colour: the optimizer; marker: the constraint; a grid's frontier is thin, in its constraint's
    line style, a search's thick and solid over hollow points. The legend says all of it."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=120)
    by_pair = defaultdict(list)
    for row in rows:
        if row.plottable:
            by_pair[row.pair, row.searched].append(row)
    styles: dict[str, str] = {}  # the grid frontiers' line styles, by constraint
    for (pair, searched), members in sorted(by_pair.items()):
        if not searched:
            styles[members[0].constraint] = CONSTRAINT_LINESTYLES.get(members[0].constraint, "-")
        colour = OPTIMIZER_COLOURS.get(members[0].optimizer, "tab:gray")
        marker = CONSTRAINT_MARKERS.get(members[0].constraint, "o")
        axes.scatter(
            [r.bound for r in members], [100 * r.accuracy for r in members],
            color=colour, marker=marker, s=60 if marker == "*" else 36, label=f"{pair} (searched)" if searched else pair,
            alpha=0.35 if searched else 0.85, facecolors="none" if searched else colour,
        )
        frontier = sorted((r for r in members if r.on_frontier), key=lambda r: r.bound)
        axes.plot(
            [r.bound for r in frontier], [100 * r.accuracy for r in frontier],
            color=colour, linestyle="-" if searched else CONSTRAINT_LINESTYLES.get(members[0].constraint, "-"),
            linewidth=2.4 if searched else 1.2, alpha=0.9 if searched else 0.8,
        )
    axes.set_xscale("log")
    axes.set_xlabel("certified Lipschitz bound (log scale)")
    axes.set_ylabel("accuracy on the 10,000 test images (%)")
    any_searched = any(searched for _, searched in by_pair)
    axes.set_title(title or _title(grid=bool(styles), searched=any_searched), fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    points, _ = axes.get_legend_handles_labels()
    axes.legend(handles=[*points, *_line_legend(dict(sorted(styles.items())), any_searched)], fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun (or run) directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write tradeoff.{csv,md,png} (default: the directory, when only one is given)")
    parser.add_argument("--force", action="store_true", help="replace a report already in --out")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    if args.out is None and len(args.dirs) > 1:
        # the first folder's own report may be there already: a report of several is not it
        parser.error(f"{len(args.dirs)} directories make one report: say where it goes with --out DIR")
    rows = collect(args.dirs)
    if not rows:
        parser.error(f"no runs (summary.json or .hydra/) under {', '.join(map(str, args.dirs))}")
    pyplot()  # the figure is written with the tables: without matplotlib, one line and no tables
    out = args.out or args.dirs[0]
    stability_runs = [run for run in stability.collect(args.dirs) if run.max_logit is not None]
    names = [f"{stem}.{ext}" for stem in ("tradeoff", *(["stability"] if stability_runs else [])) for ext in ("csv", "md", "png")]
    earlier = [name for name in names if (out / name).exists()]
    if earlier and not args.force:
        parser.error(f"{out} already holds a report ({', '.join(earlier)}): --force replaces it, --out DIR writes one elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, study_counts(args.dirs))
    write_csv(rows, out / "tradeoff.csv")
    (out / "tradeoff.md").write_text(table + "\n")
    plot(rows, out / "tradeoff.png", args.title)
    print(table)
    replaced = " (replacing the earlier report)" if earlier else ""
    print(f"\nwrote {out / 'tradeoff.csv'}, {out / 'tradeoff.md'}, {out / 'tradeoff.png'}{replaced}")
    if stability_runs:  # a stability sweep's runs (stability/* metrics): its table and figure too
        print("\n" + stability.write(stability_runs, out))
        print(f"\nwrote {out / 'stability.csv'}, {out / 'stability.md'}, {out / 'stability.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
