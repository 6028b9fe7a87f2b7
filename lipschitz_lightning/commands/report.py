"""Gather a sweep's runs into one table and the paper's picture: certified bound vs accuracy.

    python -m lipschitz_lightning.report logs/cifar_tradeoff/multiruns/<date> [more dirs] [--out DIR]

Every run directory (one holding ``summary.json`` or Hydra's ``.hydra/``) is one row. Runs that
failed, diverged or never finished are rows too, with their status and error, and are listed
under the table rather than dropped. Writes ``tradeoff.csv``, ``tradeoff.md`` and ``tradeoff.png``
into ``--out`` (default: the first directory) and prints the markdown.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lipschitz_lightning.commands.tradeoff import describe
from lipschitz_lightning.errors import OneLineParser


@dataclass
class RunRow:
    run: str
    status: str  # completed, failed, incomplete
    pair: str = ""
    optimizer: str = ""
    constraint: str = ""
    w_max: float | None = None
    weight_decay: float | None = None
    lr: float | None = None
    step: int | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    bound: float | None = None
    wall_time_s: float | None = None
    layer_norms: str = ""
    error: str = ""
    on_frontier: bool = field(default=False)

    @property
    def plottable(self) -> bool:
        return (
            self.status == "completed"
            and self.val_acc is not None
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


def _read_run(directory: Path, root: Path) -> RunRow:
    name = str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        config = summary.get("config") or {}
    else:
        # killed, or still running: only Hydra's record of the composed config is there
        summary = {"status": "incomplete", "error": "no summary.json: the run was killed, crashed or is still running"}
        config = _hydra_config(directory / ".hydra" / "config.yaml")
    row = RunRow(run=name, status=summary.get("status", "completed"), error=summary.get("error", ""))
    try:
        label = describe(config)
        row.pair, row.optimizer, row.constraint = label.pair, label.optimizer, label.constraint
        row.w_max, row.weight_decay, row.lr = label.w_max, label.weight_decay, label.lr
    except (KeyError, TypeError, ValueError, AttributeError):
        pass  # an unresolvable config (e.g. the run died composing it): the row keeps its status and error
    row.step = summary.get("step")
    row.val_acc, row.val_loss = summary.get("val/acc"), summary.get("val/loss")
    row.bound, row.wall_time_s = summary.get("lipschitz/bound"), summary.get("wall_time_s")
    row.layer_norms = " ".join(f"{k[len('norm/'):]}={v:.3g}" for k, v in summary.items() if k.startswith("norm/"))
    if row.status == "completed" and not row.plottable:
        row.status, row.error = "failed", row.error or "no finite accuracy and bound in summary.json"
    return row


def collect(roots: list[Path]) -> list[RunRow]:
    rows = []
    for root in roots:
        # with several sweeps, "0" alone would not say which sweep's job 0 a row is
        anchor = root.parent if len(roots) > 1 else root
        rows += [_read_run(directory, anchor) for directory in _run_dirs(root)]
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
    by_pair = defaultdict(list)
    for row in rows:
        if row.plottable:
            by_pair[row.pair].append(row)
    for members in by_pair.values():
        for i in pareto_frontier([(r.bound, r.val_acc) for r in members]):
            members[i].on_frontier = True


def write_csv(rows: list[RunRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0]).keys()) if rows else ["run"])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[RunRow]) -> str:
    done = sorted((r for r in rows if r.plottable), key=lambda r: (r.pair, r.bound))
    lines = [
        "| pair | w_max | wd | lr | val acc | val loss | certified bound | frontier | layer norms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in done:
        lines.append(
            f"| {r.pair} | {_fmt(r.w_max, 'g')} | {_fmt(r.weight_decay, 'g')} | {_fmt(r.lr, 'g')} | "
            f"{100 * r.val_acc:.2f}% | {_fmt(r.val_loss, '.4f')} | {r.bound:.4g} | {'yes' if r.on_frontier else ''} | "
            f"{r.layer_norms} |"
        )
    not_done = [r for r in rows if not r.plottable]
    lines.append("")
    lines.append(f"{len(done)} completed, {len(not_done)} failed or incomplete.")
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


def plot(rows: list[RunRow], path: Path, title: str = ""):
    """Scatter every completed run, one frontier line per pair; return the figure (for tests)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=120)
    by_pair = defaultdict(list)
    for row in rows:
        if row.plottable:
            by_pair[row.pair].append(row)
    for pair, members in sorted(by_pair.items()):
        colour = OPTIMIZER_COLOURS.get(members[0].optimizer, "tab:gray")
        marker = CONSTRAINT_MARKERS.get(members[0].constraint, "o")
        axes.scatter(
            [r.bound for r in members], [100 * r.val_acc for r in members],
            color=colour, marker=marker, s=60 if marker == "*" else 36, label=pair, alpha=0.85,
        )
        frontier = sorted((r for r in members if r.on_frontier), key=lambda r: r.bound)
        axes.plot(
            [r.bound for r in frontier], [100 * r.val_acc for r in frontier],
            color=colour, linestyle=CONSTRAINT_LINESTYLES.get(members[0].constraint, "-"), linewidth=1.2, alpha=0.8,
        )
    axes.set_xscale("log")
    axes.set_xlabel("certified Lipschitz bound (log scale)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(title or "Lipschitz bound vs accuracy: each [optimizer, constraint] pair and its Pareto frontier")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun (or run) directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write tradeoff.{csv,md,png}")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    rows = collect(args.dirs)
    if not rows:
        parser.error(f"no runs (summary.json or .hydra/) under {', '.join(map(str, args.dirs))}")
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    write_csv(rows, out / "tradeoff.csv")
    (out / "tradeoff.md").write_text(table + "\n")
    plot(rows, out / "tradeoff.png", args.title)
    print(table)
    print(f"\nwrote {out / 'tradeoff.csv'}, {out / 'tradeoff.md'}, {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
