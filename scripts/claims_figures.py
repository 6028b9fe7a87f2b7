"""The figures of docs/claims.md, drawn from the files the commands wrote:

    python scripts/claims_figures.py quantization <quantize.json> [<quantize.json> ...] --out docs/figures/quantization.png
    python scripts/claims_figures.py radius <certify.json> --out docs/figures/certified_vs_radius.png

``quantization``: per checkpoint and scheme, the fraction of predictions that changed beside the
fractions certified unchanged (per input, and for every input). ``radius``: certified accuracy
against the l2 radius (certify's curves: the MLP's and the ViT's), with the published anchors' points beside it; only the
points a published table gives are drawn (cited in docs/claims.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# certified accuracy (%) of published fully connected networks on CIFAR-10, without extra data (no
# attention network has a published certified accuracy there):
# (name, l2 radius, accuracy); the clean accuracy at radius 0
ANCHORS = [("AOL-FC (Prach & Lampert 2022)", 0.0, 67.1), ("AOL-FC (Prach & Lampert 2022)", 36 / 255, 58.5)]


def quantization(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    for path in paths:
        results.update(json.loads(path.read_text()))
    kinds = {"classifier": "MLP", "language_model": "GPT"}
    rows = [(f"{kinds.get(r['kind'], r['kind'])} {i + 1}: {r['run']}", scheme, s)
            for i, r in enumerate(results.values()) for scheme, s in r["schemes"].items()]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 4.5))
    xs = range(len(rows))
    width = 0.27
    changed = [100 * s["changed"] for _, _, s in rows]
    per_input = [100 * s["certified_unchanged"] for _, _, s in rows]
    every = [100 * s["certified_unchanged_by_bound"] for _, _, s in rows]
    ax.bar([x - width for x in xs], changed, width, label="predictions changed", color="tab:red")
    ax.bar(list(xs), per_input, width, label="certified unchanged, per input", color="tab:blue")
    ax.bar([x + width for x in xs], every, width, label="certified unchanged, every input", color="tab:green")
    ax.set_xticks(list(xs), [f"{run}\n{scheme}" for run, scheme, _ in rows], rotation=90, fontsize=7)
    ax.set_ylabel("% of test predictions")
    ax.set_title("Rounding a trained network: what changed, and what the bound proves unchanged")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def radius(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for path in paths:
        for name, result in json.loads(path.read_text()).items():
            if result.get("kind") != "classifier":
                continue
            curve = result["curve"]
            label = ", ".join(part for part in (result.get("network", "MLP"), result.get("run") or name) if part)
            (line,) = ax.plot([255 * r for r in curve["radius"]], [100 * a for a in curve["certified_acc"]], label=f"ours: {label}")
            for row in result["radii"]:
                ax.plot(255 * row["radius"], 100 * row["empirical_acc"], "x", color="gray")
            local = [(255 * row["radius"], 100 * row["certified_acc_local"]) for row in result["radii"] if "certified_acc_local" in row]
            if local:  # the local certificate, around each test image (the ViT's)
                ax.plot(*zip(*local), "s", color=line.get_color(), label=f"ours: {label}, local certificate")
    for name, r, accuracy in ANCHORS:
        ax.plot(255 * r, accuracy, "o", color="black")
        ax.annotate(f"{name}: {accuracy}%", (255 * r, accuracy), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("l2 radius (x 1/255, pixels in [0, 1])")
    ax.set_ylabel("certified accuracy, % of the 10,000 test images")
    ax.set_title("CIFAR-10: certified accuracy against radius\n(x: the same network attacked by PGD; squares: the local certificate)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=["quantization", "radius"])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    {"quantization": quantization, "radius": radius}[args.figure](args.inputs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
