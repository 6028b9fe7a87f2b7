"""The stability claim, read off a sweep (``+sweep=shakespeare_stability``): for each [optimizer,
constraint] pair and learning rate, the final validation loss, whether the run diverged, its loss
spikes, and the largest attention logit any block reached over training next to the certificate's
bound on it. ``report`` writes it beside the tradeoff table when a sweep's runs recorded
``stability/`` metrics::

    python -m lipschitz_lightning.report logs/shakespeare_stability/multiruns/<date>

Writes ``stability.csv``, ``stability.md`` and ``stability.png``: validation loss against learning
rate per pair (a run with no finite loss is a cross at the top, one far above the rest a
triangle there labelled with its loss), and the largest |logit| over steps per run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipschitz_lightning.commands.extras import pyplot
from lipschitz_lightning.config.tradeoff import constraint_name


@dataclass
class StabilityRun:
    run: str
    pair: str  # "muon + spectral_soft_cap", "muon + none + QK-clip 100", "adamw + weight_decay 0.1"
    lr: float
    status: str  # completed, failed (a NaN loss or any other error), incomplete
    step: int | None = None  # the last step reached
    val_loss: float | None = None
    loss_spikes: int | None = None
    max_logit: float | None = None  # over every logged step and block: the largest |pre-softmax logit|
    max_logit_bound: float | None = None  # the certificate's bound on it at the same logging step
    max_activation_rms: float | None = None
    error: str = ""
    logits: list[tuple[int, float]] = field(default_factory=list, repr=False)  # (step, largest |logit| over blocks)

    @property
    def trained(self) -> bool:
        return self.status == "completed" and self.val_loss is not None and math.isfinite(self.val_loss)


def pair_label(config: dict) -> str:
    optimizer = config["optimizer"]["_target_"].rsplit(".", 1)[-1].lower()
    constraint = constraint_name(config["constraint"])
    label = f"{optimizer} + {constraint}"
    decay = float(config["optimizer"].get("weight_decay") or 0.0)
    if constraint == "none" and decay > 0:
        label = f"{optimizer} + weight_decay {decay:g}"
    clip = ((config.get("model") or {}).get("net") or {}).get("logit_clip")
    return label + (f" + QK-clip {clip:g}" if clip else "")


def logged_rows(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def collect(roots: list[Path]) -> list[StabilityRun]:
    """Every run under ``roots`` whose summary carries a config; its logged stability metrics."""
    runs = []
    for summary_path in sorted(p for root in roots for p in root.rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        config = summary.get("config") or {}
        if "optimizer" not in config or "constraint" not in config:
            continue
        run = StabilityRun(run=str(summary_path.parent), pair=pair_label(config), lr=float(config["optimizer"]["lr"]),
                           status=summary.get("status", "incomplete"), step=summary.get("step"),
                           val_loss=summary.get("val/loss"), loss_spikes=_int(summary.get("stability/loss_spikes")),
                           error=summary.get("error", ""))
        largest: tuple[float, float] | None = None
        for row in logged_rows(summary_path.parent):
            blocks = sorted(key.rsplit("_", 1)[1] for key in row if key.startswith("stability/attention_max_abs_logit_") and row[key])
            if not blocks:
                continue
            reached = [(float(row[f"stability/attention_max_abs_logit_{b}"]), float(row[f"stability/attention_logit_bound_{b}"])) for b in blocks]
            step = int(float(row["step"]))
            run.logits.append((step, max(value for value, _ in reached)))
            top = max(reached)
            largest = top if largest is None or top[0] > largest[0] else largest
            rms = max(float(row[f"stability/activation_rms_max_{b}"]) for b in blocks)
            run.max_activation_rms = rms if run.max_activation_rms is None else max(run.max_activation_rms, rms)
        if largest is not None:
            run.max_logit, run.max_logit_bound = largest
        runs.append(run)
    return sorted(runs, key=lambda r: (r.pair, r.lr))


def _int(value) -> int | None:
    return None if value is None else int(value)


def usable_range(runs: list[StabilityRun], pair: str, tolerance: float = 0.1) -> tuple[float, float] | None:
    """The learning rates of ``pair`` whose run trained to within ``tolerance`` (nats) of the pair's
    best validation loss, without a loss spike: the smallest and largest."""
    trained = [r for r in runs if r.pair == pair and r.trained]
    if not trained:
        return None
    best = min(r.val_loss for r in trained)
    good = [r.lr for r in trained if r.val_loss <= best + tolerance and not r.loss_spikes]
    return (min(good), max(good)) if good else None


def markdown(runs: list[StabilityRun]) -> str:
    lines = ["| pair | lr | status | val loss | loss spikes | largest abs logit (bound) | largest activation RMS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        loss = f"{r.val_loss:.4f}" if r.trained else f"diverged at step {r.step}" if "diverged" in r.error else "-"
        logit = f"{r.max_logit:.4g} ({r.max_logit_bound:.3g})" if r.max_logit is not None else "-"
        activation = f"{r.max_activation_rms:.3g}" if r.max_activation_rms is not None else "-"
        lines.append(f"| {r.pair} | {r.lr:g} | {r.status} | {loss} | {r.loss_spikes if r.loss_spikes is not None else '-'} | {logit} | {activation} |")
    lines += ["", "| pair | usable learning rates (within 0.1 nats of its best, no spike) | span |", "| --- | --- | --- |"]
    for pair in sorted({r.pair for r in runs}):
        span = usable_range(runs, pair)
        lines.append(f"| {pair} | {span[0]:g} .. {span[1]:g} | {span[1] / span[0]:.3g}x |" if span else f"| {pair} | none | |")
    return "\n".join(lines)


def plot(runs: list[StabilityRun], path: Path) -> None:
    plt = pyplot()
    pairs = sorted({r.pair for r in runs})
    colors = {pair: plt.get_cmap("tab10")(i % 10) for i, pair in enumerate(pairs)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    trained_losses = sorted(r.val_loss for r in runs if r.trained)
    # the axis ends at 2x the median run's loss: a run far above it (a blown-up loss of 229 nats)
    # would flatten every other curve; it is drawn at the top as a triangle labelled with its loss
    ceiling = min(trained_losses[-1], 2 * trained_losses[len(trained_losses) // 2]) * 1.05 if trained_losses else 1.0
    for index, pair in enumerate(pairs):
        mine = [r for r in runs if r.pair == pair]
        trained = [r for r in mine if r.trained]
        left.plot([r.lr for r in trained], [min(r.val_loss, ceiling) for r in trained], "o-", color=colors[pair], label=pair)
        for r in trained:
            if r.val_loss > ceiling:
                left.plot([r.lr], [ceiling], "^", color=colors[pair], markersize=10)
                left.annotate(f"{r.val_loss:.3g}", (r.lr, ceiling), textcoords="offset points", xytext=(-30, -12 - 10 * index), fontsize=8, color=colors[pair])
        failed = [r for r in mine if not r.trained]
        left.plot([r.lr for r in failed], [ceiling] * len(failed), "x", color=colors[pair], markersize=10)
        for r in mine:
            if r.logits:
                steps, values = zip(*r.logits)
                right.plot(steps, values, color=colors[pair], alpha=0.35 + 0.65 * (r.lr == max(x.lr for x in mine)),
                           linewidth=1 + (r.lr == max(x.lr for x in mine)))
    left.set(xscale="log", xlabel="learning rate", ylabel="final validation loss",
             title="validation loss against learning rate (^: above the axis, x: not finite)")
    left.legend(fontsize=8)
    right.set(yscale="log", xlabel="step", ylabel="largest |attention logit| over blocks",
              title="largest attention logit over training (bold: each pair's largest lr)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(runs: list[StabilityRun], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stability.csv", "w", newline="") as handle:
        fields = [f for f in asdict(runs[0]) if f != "logits"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in runs:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "logits"})
    table = markdown(runs)
    (out / "stability.md").write_text(table + "\n")
    plot(runs, out / "stability.png")
    return table
