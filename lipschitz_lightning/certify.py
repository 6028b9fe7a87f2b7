"""What the certificate buys, for any checkpoint: certified and attacked robustness, how tight the
bound is, and what low-precision weights cost.

    python -m lipschitz_lightning.certify ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.certify 'ckpt_path=[a.ckpt,b.ckpt]' out_dir=certified

Writes ``certify.json``, ``certify.md`` (also printed) and ``certify.png`` into ``out_dir``.
Settings in ``conf/certify.yaml``. The maths is in plain functions below, free of Lightning.

Classifiers (the CIFAR-10 MLP: 3072 pixels in [0, 1] -> 10 logits, bound ``L`` in RMS units):

- in plain l2 units: ``rms(dy) <= L rms(dx)`` with ``rms(v) = ||v|| / sqrt(len v)`` gives
  ``||dy|| <= L sqrt(10 / 3072) ||dx||``, so ``L_l2 = L sqrt(classes / inputs)``;
- a point is **certified** at radius ``eps`` when it is classified correctly and its margin (top
  logit minus the runner-up) exceeds ``sqrt(2) L_l2 eps``: a logit difference ``(e_i - e_j) . y``
  moves by at most ``||e_i - e_j|| ||dy|| = sqrt(2) ||dy||``;
- **empirical** robust accuracy: what a PGD l2 attack leaves standing. A certified point that the
  attack breaks would refute the certificate: the command then fails, naming the point;
- an empirical **lower** bound on the Lipschitz constant (the largest Jacobian norm found on test
  points and by a search over input pairs), to see how loose the certified upper bound is;
- accuracy with the weights cast to bfloat16 and to float8 (e4m3, per-tensor amax scaling).

Language models: the certificate, and per block its activation-RMS and attention-logit bounds
next to the largest values observed on the validation split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from lipschitz_lightning.errors import ConfigError, LipschitzLightningError


class CertificateBroken(LipschitzLightningError):
    """An attack or a search went past what the certificate guarantees: a bug, never a result."""


# ----------------------------------------------------------------------------- the maths


def l2_bound(rms_bound: float, inputs: int, outputs: int) -> float:
    """The Lipschitz bound in plain l2 units from the one in RMS units."""
    return rms_bound * math.sqrt(outputs / inputs)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit of the true class minus the largest other logit (negative: misclassified)."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def certified(margin: Tensor, bound_l2: float, eps: float) -> Tensor:
    """Points no input within l2 distance ``eps`` can misclassify."""
    return margin > math.sqrt(2) * bound_l2 * eps


def project_l2(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Back into the l2 ball of radius ``eps`` around 0 and into the pixel box ``[0, 1]``."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *(1,) * (delta.ndim - 1))
    delta = delta * (eps / norms).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def pgd_l2(net: nn.Module, x: Tensor, labels: Tensor, eps: float, steps: int, restarts: int, generator: torch.Generator) -> Tensor:
    """Which points a PGD l2 attack (margin loss, normalised gradient steps of ``2.5 eps / steps``)
    misclassifies within radius ``eps``; restarts from random points of the ball."""
    broken = torch.zeros(len(x), dtype=torch.bool)
    step = 2.5 * eps / steps
    for restart in range(restarts):
        delta = torch.zeros_like(x)
        if restart:
            delta = project_l2(torch.randn(x.shape, generator=generator) * eps, x, eps)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = -margins(net(x + delta), labels).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *(1,) * (x.ndim - 1))
                delta = project_l2(delta + step * grad / norms, x, eps)
        with torch.no_grad():
            broken |= margins(net(x + delta), labels) <= 0
    return broken


def rms(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).mean(dim=1).sqrt()


def jacobian_lower_bound(net: nn.Module, x: Tensor) -> float:
    """The largest RMS->RMS norm of the network's Jacobian at the points ``x``: a lower bound on
    its Lipschitz constant (the constant is the supremum of that norm)."""
    jacobians = torch.func.vmap(torch.func.jacrev(lambda point: net(point[None])[0]))(x)  # (N, classes, *input)
    jacobians = jacobians.flatten(2)
    outputs, inputs = jacobians.shape[1:]
    return float(torch.linalg.matrix_norm(jacobians.double(), ord=2).max()) * math.sqrt(inputs / outputs)


def pair_search_lower_bound(net: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> float:
    """The largest ``rms(f(a) - f(b)) / rms(a - b)`` found by Adam over pairs starting at test
    points and their near neighbours, both kept in the pixel box."""
    a = x.clone().requires_grad_(True)
    b = (x + 0.01 * torch.randn(x.shape, generator=generator)).clamp(0, 1).requires_grad_(True)
    search = torch.optim.Adam([a, b], lr=1e-2)
    best = 0.0
    for _ in range(steps):
        ratio = rms(net(a) - net(b)) / rms(a - b).clamp(min=1e-12)
        best = max(best, float(ratio.detach().max()))
        search.zero_grad()
        (-ratio.sum()).backward()
        search.step()
        with torch.no_grad():
            a.clamp_(0, 1), b.clamp_(0, 1)
    return best


FLOAT8_MAX = 448.0  # the largest float8 e4m3fn value


def with_weights_cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``net`` whose weights went through ``dtype`` and back to float32. Float8 scales
    each tensor so that its largest entry lands on the format's largest value (per-tensor amax
    scaling, as fp8 training recipes do); without it most small weights would underflow."""
    import copy

    cast = copy.deepcopy(net)
    with torch.no_grad():
        for p in cast.parameters():
            if dtype == torch.float8_e4m3fn:
                scale = p.abs().max().clamp(min=1e-30) / FLOAT8_MAX
                p.copy_((p / scale).to(dtype).float() * scale)
            else:
                p.copy_(p.to(dtype).float())
    return cast


# ----------------------------------------------------------------------------- per checkpoint


@dataclass
class Loaded:
    path: Path
    saved: object  # checkpoints.SavedNetwork
    datamodule: object


def load(cfg: DictConfig, ckpt_path: str) -> Loaded:
    from hydra.utils import instantiate

    from lipschitz_lightning.checkpoints import load_network
    from lipschitz_lightning.evaluate import data_config

    saved = load_network(ckpt_path)
    run_config = saved.checkpoint.get("run_config")
    if not run_config or "data" not in run_config:
        raise ConfigError(f"ckpt_path {ckpt_path!r} carries no run config, so its validation data is unknown; train it again")
    datamodule = instantiate(data_config(cfg, run_config["data"]))
    datamodule.prepare_data()
    datamodule.setup("validate")
    return Loaded(Path(ckpt_path), saved, datamodule)


def validation_batches(loaded: Loaded, limit: int | None):
    count = 0
    for batch in loaded.datamodule.val_dataloader():
        x, y = loaded.datamodule.on_after_batch_transfer(batch, 0) if hasattr(loaded.datamodule, "on_after_batch_transfer") else batch
        yield x, y
        count += len(x)
        if limit is not None and count >= limit:
            return


def certify_classifier(cfg: DictConfig, loaded: Loaded) -> dict:
    net = loaded.saved.net.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.cat(parts)[: cfg.examples] for parts in zip(*validation_batches(loaded, cfg.examples)))
    inputs, outputs = x[0].numel(), net(x[:1]).shape[-1]
    bound = net.certified_bound()
    bound_l2 = l2_bound(bound, inputs, outputs)
    with torch.no_grad():
        logits = torch.cat([net(chunk) for chunk in x.split(1000)])
    margin = margins(logits, y)
    correct = margin > 0

    rows = []
    for eps in cfg.radii:
        safe = certified(margin, bound_l2, eps)
        broken = torch.zeros(len(x), dtype=torch.bool)
        attacked = correct.nonzero()[:, 0]  # a misclassified point needs no attack
        for chunk in attacked.split(cfg.attack.batch):
            broken[chunk] = pgd_l2(net, x[chunk], y[chunk], eps, cfg.attack.steps, cfg.attack.restarts, generator)
        survivors = correct & ~broken
        violated = (safe & broken).nonzero()[:, 0]
        if len(violated):
            raise CertificateBroken(
                f"{loaded.path}: the PGD attack misclassified validation point {int(violated[0])} within l2 radius {eps:.4f}, "
                f"which the certificate (bound {bound:.4g}, margin {float(margin[violated[0]]):.4g}) says is impossible"
            )
        rows.append({"radius": eps, "certified_acc": float(safe.float().mean()), "empirical_acc": float(survivors.float().mean())})

    sample = x[: cfg.lower_bound.points]
    jacobian = jacobian_lower_bound(net, sample)
    searched = pair_search_lower_bound(net, sample[: cfg.lower_bound.pairs], cfg.lower_bound.steps, generator)
    lower = max(jacobian, searched)
    if lower > bound * (1 + 1e-4):
        raise CertificateBroken(f"{loaded.path}: found a Lipschitz ratio of {lower:.6g} above the certified bound {bound:.6g}")

    grid = torch.linspace(0, cfg.curve_max_radius, 101)
    curve = [float((correct & (margin > math.sqrt(2) * bound_l2 * eps)).float().mean()) for eps in grid.tolist()]
    precision = {"float32": float(correct.float().mean())}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float8_e4m3", torch.float8_e4m3fn)):
        cast = with_weights_cast(net, dtype)
        with torch.no_grad():
            precision[name] = float((torch.cat([cast(chunk) for chunk in x.split(1000)]).argmax(1) == y).float().mean())
    return {
        "kind": "classifier",
        "examples": len(x),
        "bound_rms": bound,
        "bound_l2": bound_l2,
        "radii": rows,
        "lower_bound_jacobian": jacobian,
        "lower_bound_pair_search": searched,
        "lower_bound": lower,
        "bound_over_lower_bound": bound / lower if lower > 0 else math.inf,
        "accuracy_by_weight_precision": precision,
        "curve": {"radius": grid.tolist(), "certified_acc": curve},
    }


def certify_language_model(cfg: DictConfig, loaded: Loaded) -> dict:
    net = loaded.saved.net.float().eval()
    certificate = net.certificate()
    observed: dict[str, float] = {}
    with torch.no_grad():
        for index, (x, _) in enumerate(loaded.datamodule.val_dataloader()):
            if index >= cfg.max_batches:
                break
            stats: dict = {}
            net(x[:, : cfg.stats_tokens], stats=stats, window=net.window_size(1.0))
            for name, value in stats.items():
                observed[name] = max(observed.get(name, float("-inf")), float(value))
    blocks = []
    for l in range(net.config.num_blocks):
        row = {
            "block": l,
            "activation_rms_certified": certificate.activation_rms[l],
            "activation_rms_observed": observed[f"activation/rms_max_block{l}"],
            "attention_logit_certified": certificate.attention_logit[l],
            "attention_logit_observed": observed[f"attention/max_logit_{l}"],
        }
        if row["activation_rms_observed"] > row["activation_rms_certified"] * (1 + 1e-4) or abs(row["attention_logit_observed"]) > row["attention_logit_certified"] * (1 + 1e-4):
            raise CertificateBroken(f"{loaded.path}: block {l} observed {row}, above its certified bounds")
        blocks.append(row)
    return {
        "kind": "language_model",
        "bound": certificate.bound,
        "bound_paper_formula": net.paper_formula_bound(),
        "input_radius": certificate.input_radius,
        "blocks": blocks,
    }


# ----------------------------------------------------------------------------- reports


def markdown(results: dict[str, dict]) -> str:
    lines = []
    classifiers = {k: v for k, v in results.items() if v["kind"] == "classifier"}
    if classifiers:
        radii = next(iter(classifiers.values()))["radii"]
        head = ["checkpoint", "bound (RMS)", "bound (l2)", "lower bound", "ratio",
                *[f"cert / PGD acc @ {r['radius'] * 255:.0f}/255" for r in radii], "acc fp32 / bf16 / fp8"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for name, r in classifiers.items():
            p = r["accuracy_by_weight_precision"]
            cells = [name, f"{r['bound_rms']:.4g}", f"{r['bound_l2']:.4g}", f"{r['lower_bound']:.4g}", f"{r['bound_over_lower_bound']:.3g}x",
                     *[f"{row['certified_acc']:.1%} / {row['empirical_acc']:.1%}" for row in r["radii"]],
                     f"{p['float32']:.1%} / {p['bfloat16']:.1%} / {p['float8_e4m3']:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    for name, r in results.items():
        if r["kind"] != "language_model":
            continue
        lines += ["", f"{name}: certified bound {r['bound']:.4g} (the paper's formula: {r['bound_paper_formula']:.4g}), "
                  f"inputs of token RMS <= {r['input_radius']:.3g}", "",
                  "| block | activation RMS: certified | observed | attention logit: certified | observed |",
                  "| --- | --- | --- | --- | --- |"]
        for b in r["blocks"]:
            lines.append(f"| {b['block']} | {b['activation_rms_certified']:.4g} | {b['activation_rms_observed']:.4g} | "
                         f"{b['attention_logit_certified']:.4g} | {b['attention_logit_observed']:.4g} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """Classifiers: certified accuracy against radius (lines) and under PGD (dots). Language models:
    each block's certified activation RMS and attention logit against the observed ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifiers = {k: v for k, v in results.items() if v["kind"] == "classifier"}
    models = {k: v for k, v in results.items() if v["kind"] == "language_model"}
    figure, panels = plt.subplots(1, bool(classifiers) + bool(models), figsize=(7 * (bool(classifiers) + bool(models)), 4.5), squeeze=False)
    panels = list(panels[0])
    if classifiers:
        axes = panels.pop(0)
        for name, r in classifiers.items():
            (line,) = axes.plot([e * 255 for e in r["curve"]["radius"]], r["curve"]["certified_acc"], label=f"{name} (certified)")
            axes.plot([row["radius"] * 255 for row in r["radii"]], [row["empirical_acc"] for row in r["radii"]], "o", color=line.get_color())
        axes.set(xlabel="l2 radius (x 1/255, pixels in [0, 1])", ylabel="accuracy", title="certified accuracy (lines) and under PGD (dots)")
        axes.legend(fontsize=8)
    if models:
        axes = panels.pop(0)
        for name, r in models.items():
            blocks = [b["block"] for b in r["blocks"]]
            for key, marker in (("activation_rms", "o"), ("attention_logit", "s")):
                (line,) = axes.plot(blocks, [b[f"{key}_certified"] for b in r["blocks"]], marker + "-", label=f"{name}: {key} certified")
                axes.plot(blocks, [b[f"{key}_observed"] for b in r["blocks"]], marker + "--", color=line.get_color(), label=f"{name}: {key} observed")
        axes.set(xlabel="block", yscale="log", title="per block: certified bound (solid) and largest observed (dashed)")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def certify(cfg: DictConfig) -> dict[str, dict]:
    paths = list(cfg.ckpt_path) if isinstance(cfg.ckpt_path, (list, ListConfig)) else [cfg.ckpt_path]
    if not paths:
        raise ConfigError("ckpt_path must name at least one checkpoint")
    for key in ("radii",):
        if not all(isinstance(r, (int, float)) and r > 0 for r in cfg[key]):
            raise ConfigError(f"{key} must be a list of numbers > 0, got {OmegaConf.to_container(cfg[key])}")
    for key in ("attack.steps", "attack.restarts", "attack.batch", "lower_bound.points", "lower_bound.pairs", "lower_bound.steps", "max_batches", "stats_tokens"):
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    torch.manual_seed(cfg.seed)
    results = {}
    for path in paths:
        started = time.perf_counter()
        loaded = load(cfg, str(path))
        kind = getattr(loaded.saved.net, "certificate", None)
        result = certify_language_model(cfg, loaded) if kind is not None else certify_classifier(cfg, loaded)
        result["seconds"] = time.perf_counter() - started
        results[_name(Path(path), paths)] = result
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certify.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "certify.md").write_text(table + "\n")
    plot(results, out / "certify.png")
    return results


def _name(path: Path, paths: list) -> str:
    """A checkpoint's short name: its run directory's (``<run>/checkpoints/last.ckpt`` -> ``<run>``)."""
    run = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    return run if sum(1 for p in paths if Path(p).parent.parent.name == run) == 1 else f"{run}/{path.name}"


@hydra.main(version_base="1.3", config_path="../conf", config_name="certify")
def main(cfg: DictConfig) -> None:
    try:
        results = certify(cfg)
    except LipschitzLightningError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(markdown(results), flush=True)
    print(f"\nwritten: {Path(cfg.out_dir) / 'certify.json'}, certify.md, certify.png", flush=True)


if __name__ == "__main__":
    main()
