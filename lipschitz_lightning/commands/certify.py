"""What the certified bound buys, for any checkpoint: certified against attacked robustness, how
tight the bound is, what low-precision weights cost; for a language model, each block's certified
activation and attention-logit bounds against what the validation data reaches.

    python -m lipschitz_lightning.certify ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.certify 'ckpt_path=[<run a>/checkpoints/last.ckpt,<run b>/checkpoints/last.ckpt]' out_dir=certified

It writes ``certify.json``, ``certify.md`` (the table it also prints) and ``certify.png`` into
``out_dir``; by default (``out_dir=null``) into the run directory of the first checkpoint
(``<run>/`` for ``<run>/checkpoints/last.ckpt``), beside its ``summary.json``. It creates no other
directory. Settings are in ``conf/certify.yaml``.

Classifiers: the maths is in ``lipschitz_lightning.robustness`` (``certified``: margins and radii
in l2 pixel units; ``attacks``: PGD and the lower-bound search; ``precision``: rounded weights).

Language models (``model=gpt``)
-------------------------------
The certificate of docs/certificate.md (``net.certificate()``) and, per block, its bounds on the
largest activation RMS and on the largest ``|pre-softmax logit|`` next to the largest values the
network reaches on the validation split (``observe_language_model``). An observed value above its
certified bound fails the command.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lipschitz_lightning.commands.extras import available, install_line, needs, pyplot
from lipschitz_lightning.commands.runs import Loaded, load_run
from lipschitz_lightning.core.losses import parse_radius
from lipschitz_lightning.errors import (
    ConfigError,
    DataError,
    LipschitzLightningError,
    exit_with,
)
from lipschitz_lightning.robustness.attacks import (
    autoattack_l2,
    jacobian_norms,
    lipschitz_violation,
    pair_search,
    pgd_l2,
)
from lipschitz_lightning.robustness.certified import (
    SLACK,
    certified,
    certified_radius,
    l2_bound,
    margins,
)
from lipschitz_lightning.robustness.observe import (
    compare_blocks,
    observe_language_model,
)
from lipschitz_lightning.robustness.precision import with_weights_cast


class CertificateBroken(LipschitzLightningError):
    """An attack, a search or the data went past what the certificate guarantees: a bug, never a result."""


# Exit status of the command: 1 for a setting, checkpoint or data the user can fix, 2 for a broken certificate.
EXIT_BAD_INPUT, EXIT_CERTIFICATE_BROKEN = 1, 2


def check_blocks(rows: list[dict], where: str) -> None:
    for row in rows:
        for key in ("activation_rms", "attention_logit"):
            seen, bound = row[f"{key}_observed"], row[f"{key}_certified"]
            # the observations are float32 activations: allow their rounding, nothing more
            if seen > bound * (1 + 1e-4):
                raise CertificateBroken(
                    f"{where}: block {row['block']} reached {key.replace('_', ' ')} {seen:.6g} on the validation data, "
                    f"above its certified bound {bound:.6g}"
                )


# ----------------------------------------------------------------------------- the command


def checkpoint_paths(cfg) -> list[str]:
    """What the settings' types cannot say, checked before anything is loaded (the types are
    ``settings.CertifySettings``'s, or ``QuantizeSettings``' for quantize); returns the checkpoint paths."""
    paths = [cfg.ckpt_path] if isinstance(cfg.ckpt_path, str) else list(cfg.ckpt_path)
    for path in paths:  # all of them before any work (load_network says the same of a file it cannot read)
        if not Path(path).is_file():
            raise ConfigError(f"ckpt_path must be an existing checkpoint file, got {path!r}")
    if "autoattack" in cfg and cfg.autoattack.examples > 0 and not available("torchattacks"):  # certify's, not quantize's
        raise ConfigError(f"autoattack.examples={cfg.autoattack.examples}: AutoAttack needs torchattacks: {install_line('torchattacks')} "
                          f"(README.md says why without its dependencies); or give autoattack.examples=0")
    out = output_dir(cfg)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"out_dir {str(out)!r} cannot be written: {str(existing)!r} is not a writable folder")
    return [str(p) for p in paths]


def validation_set(loaded: Loaded, limit: int | None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` test images (all when None), as the module sees them: the validation split,
    or the test split of a run that validated on images held out of training (``data.holdout``)."""
    xs, ys, count = [], [], 0
    datamodule = loaded.datamodule
    held_out = getattr(datamodule, "holds_out_validation", False)
    for batch in datamodule.test_dataloader() if held_out else datamodule.val_dataloader():
        x, y = datamodule.on_after_batch_transfer(batch, 0)
        xs.append(x), ys.append(y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    return torch.cat(xs)[:limit].float(), torch.cat(ys)[:limit]


def frozen(net: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    net = copy.deepcopy(net).to(dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def run_label(run_config: dict) -> str:
    try:
        from lipschitz_lightning.commands.tradeoff import describe

        label = describe(run_config)
        loss = run_config.get("loss") or {}
        trained = ""
        if loss.get("radius"):
            trained = f", margin loss at {loss['radius']}, T {loss.get('temperature', 1):g}"
        elif loss.get("temperature", 1) != 1:
            trained = f", T {loss['temperature']:g}"
        return label.pair + (f", w_max {label.w_max:.3g}" if label.w_max is not None else "") + trained
    except (KeyError, TypeError, AttributeError):
        return ""


def attack_radius_by_radius(cfg, net, net64, x, y, margin, bound: float, bound_l2: float, where: str) -> tuple[list[dict], int, dict]:
    """Certified against attacked accuracy at each radius, ascending: a point broken at a radius is
    broken at every larger one. A certified point that PGD flips stops the command, unless float64
    says the flip is float32's rounding; such flips are counted (the second value). The third: the
    points PGD left correctly classified, per radius."""
    generator = torch.Generator().manual_seed(cfg.seed)
    broken = ~(margin > 0)  # a misclassified point needs no attack (nor does a NaN margin)
    rows, rounding_only, survived = [], 0, {}
    for eps in sorted(set(float(r) for r in cfg.radii)):
        safe = certified(margin, bound_l2, eps)
        for part in (~broken).nonzero()[:, 0].split(cfg.attack.batch):
            hit, delta = pgd_l2(net, x[part], y[part], eps, steps=cfg.attack.steps, restarts=cfg.attack.restarts,
                                step_size=cfg.attack.step_size, generator=generator)
            for i in (safe[part] & hit).nonzero()[:, 0].tolist():
                index = int(part[i])
                if confirmed_break(net64, x, delta[i], y, index, eps, bound, bound_l2, where, "PGD"):
                    continue
                rounding_only += 1  # flipped in float32 only; float64 says the bound holds
                hit[i] = False
            broken[part[hit]] = True
        # a certified point is never broken here: the loop above raised or let it survive
        survivors = ~broken
        survived[eps] = survivors.clone()
        rows.append({"radius": eps, "radius_x255": eps * 255, "certified_acc": float(safe.float().mean()),
                     "empirical_acc": float(survivors.float().mean()), "certified_points": int(safe.sum()),
                     "surviving_points": int(survivors.sum())})
    return rows, rounding_only, survived


def confirmed_break(net64, x, delta, y, index: int, eps: float, bound: float, bound_l2: float, where: str, attack: str) -> bool:
    """A certified point an attack flipped: re-checked in float64, it stops the command with the
    numbers (CertificateBroken), or it was float32's rounding (False)."""
    violation = lipschitz_violation(net64, x[index], delta, y[index], bound_l2)
    if violation is None:
        return False
    raise CertificateBroken(
        f"certificate broken: {where}: {attack} flipped validation point {index} within l2 radius {eps:.6g} "
        f"({eps * 255:.4g}/255), where the certified bound {bound:.6g} (RMS units) forbids it: margin "
        f"{violation['margin_before']:.6g} -> {violation['margin_after']:.6g} over l2 distance "
        f"{violation['l2_distance']:.6g}, more than the certified drop {violation['allowed_drop']:.6g} (float64)"
    )


def autoattack_beside_pgd(cfg, net, net64, x, y, margin, bound: float, bound_l2: float, survived: dict, where: str) -> dict | None:
    """AutoAttack (torchattacks, l2, standard) at the first radius on the first ``autoattack.examples``
    points, beside PGD's result on the same points: where AutoAttack breaks points PGD left standing,
    our attack is weak. A certified point it flips stops the command, as for PGD."""
    count = min(cfg.autoattack.examples, len(x))
    if count == 0:
        return None
    eps = min(float(r) for r in cfg.radii)
    points = torch.arange(count)
    correct = points[margin[:count] > 0]
    started = time.perf_counter()
    auto_attack = needs("torchattacks", "AutoAttack needs torchattacks").AutoAttack
    hit, delta = autoattack_l2(auto_attack, net, x[correct], y[correct], eps, version=cfg.autoattack.version, seed=cfg.seed,
                               batch=cfg.attack.batch)
    safe = certified(margin[:count], bound_l2, eps)
    for i in (safe[correct] & hit).nonzero()[:, 0].tolist():
        if not confirmed_break(net64, x, delta[i], y, int(correct[i]), eps, bound, bound_l2, where, "AutoAttack"):
            hit[i] = False  # float32's rounding, as for PGD
    autoattack_survivors = torch.zeros(count, dtype=torch.bool)
    autoattack_survivors[correct] = ~hit
    pgd_survivors = survived[eps][:count]
    return {"radius": eps, "radius_x255": eps * 255, "examples": count, "version": cfg.autoattack.version,
            "certified_acc": float(safe.float().mean()), "pgd_acc": float(pgd_survivors.float().mean()),
            "autoattack_acc": float(autoattack_survivors.float().mean()),
            "broken_by_autoattack_only": int((pgd_survivors & ~autoattack_survivors).sum()),
            "broken_by_pgd_only": int((~pgd_survivors & autoattack_survivors).sum()),
            "seconds": time.perf_counter() - started}


def search_lower_bound(cfg, net, net64, x, bound: float, where: str) -> dict:
    """A lower bound on the Lipschitz constant: Jacobian norms at validation points, then a pair
    search from the steepest of them. One above the certified bound stops the command."""
    sample = x[: cfg.lower_bound.points]
    norms, directions = jacobian_norms(net64, sample.double())
    order = norms.argsort(descending=True)[: cfg.lower_bound.pairs]
    searched, row = pair_search(net, net64, sample[order], directions[order], steps=cfg.lower_bound.steps,
                                lr=cfg.lower_bound.lr, gap=cfg.lower_bound.gap)
    jacobian_best = float(norms.max())
    lower = max(jacobian_best, searched)
    if lower > bound * (1 + SLACK):
        how = (f"the Jacobian at validation point {int(norms.argmax())} has RMS->RMS norm {jacobian_best:.8g}" if jacobian_best >= searched
               else f"a pair search from validation point {int(order[row])} found rms(f(a) - f(b)) / rms(a - b) = {searched:.8g}")
        raise CertificateBroken(f"certificate broken: {where}: {how} (float64), above the certified bound {bound:.8g}")
    return {"lower_bound": lower, "lower_bound_jacobian": jacobian_best, "lower_bound_pair_search": searched,
            "lower_bound_points": len(sample), "bound_over_lower_bound": bound / lower if lower > 0 else math.inf}


def weights_in_low_precision(net, x, y, batch: int, accuracy: float, bound: float) -> dict:
    """Accuracy and certified bound with the weights rounded to bfloat16 and float8 (e4m3)."""
    precision = {"float32": {"accuracy": accuracy, "bound_rms": bound}}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float8_e4m3", torch.float8_e4m3fn)):
        cast = with_weights_cast(net, dtype)
        with torch.no_grad():
            predictions = torch.cat([cast(part) for part in x.split(batch)]).argmax(dim=1)
        precision[name] = {"accuracy": float((predictions == y).float().mean()), "bound_rms": float(cast.certified_bound())}
    return precision


def certify_classifier(cfg, loaded: Loaded) -> dict:
    where = str(loaded.path)
    net, net64 = frozen(loaded.saved.net), frozen(loaded.saved.net, torch.float64)
    x, y = validation_set(loaded, cfg.examples)
    with torch.no_grad():
        logits = torch.cat([net(part) for part in x.split(cfg.attack.batch)])
    inputs, outputs = x[0].numel(), logits.shape[1]
    bound = float(net.certified_bound())
    bound_l2 = l2_bound(bound, inputs, outputs)
    margin = margins(logits, y)
    accuracy = float((margin > 0).float().mean())

    started = time.perf_counter()
    rows, rounding_only, survived = attack_radius_by_radius(cfg, net, net64, x, y, margin, bound, bound_l2, where)
    attack_s = time.perf_counter() - started
    autoattack = autoattack_beside_pgd(cfg, net, net64, x, y, margin, bound, bound_l2, survived, where)
    started = time.perf_counter()
    lower = search_lower_bound(cfg, net, net64, x, bound, where)
    lower_bound_s = time.perf_counter() - started

    grid = torch.linspace(0, cfg.curve_max_radius, 201)
    radius = certified_radius(margin, bound_l2)
    curve = [float(((margin > 0) & (radius > eps)).float().mean()) for eps in grid.tolist()]
    return {
        "kind": "classifier",
        "checkpoint": where,
        "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)),
        "examples": len(x),
        "inputs": inputs,
        "outputs": outputs,
        "bound_rms": bound,
        "bound_l2": bound_l2,
        "layer_norms": {k: float(v) for k, v in net.layer_norms().items()} if hasattr(net, "layer_norms") else {},
        "accuracy": accuracy,
        "median_certified_radius": float(radius.median()),
        "radii": rows,
        "attack": {"steps": cfg.attack.steps, "restarts": cfg.attack.restarts, "step_size": cfg.attack.step_size,
                   "float32_only_flips_of_certified_points": rounding_only},
        "autoattack": autoattack,
        **lower,
        "weights": weights_in_low_precision(net, x, y, cfg.attack.batch, accuracy, bound),
        "curve": {"radius": grid.tolist(), "certified_acc": curve},
        "timings": {"attack_s": attack_s, "lower_bound_s": lower_bound_s},
    }


def certify_language_model(cfg, loaded: Loaded) -> dict:
    where = str(loaded.path)
    net = frozen(loaded.saved.net)
    certificate = net.certificate()
    observed = observe_language_model(net, loaded.datamodule.val_dataloader(), cfg.max_batches, cfg.stats_tokens)
    if not observed:
        raise DataError(f"{where}: the validation split gave no batch to observe")
    blocks = compare_blocks(certificate, observed)
    check_blocks(blocks, f"certificate broken: {where}")
    return {
        "kind": "language_model",
        "checkpoint": where,
        "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)),
        "bound": certificate.bound,
        "bound_paper_formula": net.paper_formula_bound(),
        "input_radius": certificate.input_radius,
        "batches_observed": min(cfg.max_batches, len(loaded.datamodule.val_dataloader())),
        "blocks": blocks,
        "at_radius": next_tokens_at_radius(cfg, net, loaded),
    }


def language_model_radius(cfg, run_config: dict | None) -> float | None:
    """``lm_radius``, or the radius the run's margin loss trained for; None when neither is set."""
    if cfg.get("lm_radius") is not None:
        return parse_radius(cfg.lm_radius)
    radius = ((run_config or {}).get("loss") or {}).get("radius")
    return parse_radius(radius) if radius else None


@torch.no_grad()
def next_tokens_at_radius(cfg, net: nn.Module, loaded: Loaded) -> dict | None:
    """The next-token predictions of the validation batches that no input within token-RMS distance
    ``radius`` of the embedded text can change (margin > sqrt(2) L_l2 radius, with L_l2 from the
    certificate of the ball of radius R + radius those inputs fill)."""
    radius = language_model_radius(cfg, loaded.run_config)
    if radius is None:
        return None
    enlarged = net.certificate(perturbation=radius)
    margin = math.sqrt(2) * net.logit_l2_bound(radius) * radius
    correct = certified_count = total = 0
    window = net.window_blocks(1.0)
    for index, (tokens, targets) in enumerate(loaded.datamodule.val_dataloader()):
        if index >= cfg.max_batches:
            break
        counts = net.next_token_loss(net.features(tokens, window=window), targets, margin=margin)
        correct, certified_count, total = correct + int(counts.correct), certified_count + int(counts.certified), total + targets.numel()
    return {"radius": radius, "bound": enlarged.bound, "input_radius": enlarged.input_radius, "margin": float(margin),
            "accuracy": correct / total, "certified_acc": certified_count / total, "positions": total}


def _names(paths: list[str]) -> list[str]:
    """Short unique names: a checkpoint's run directory (``<run>/checkpoints/last.ckpt`` -> ``<run>``),
    with the file's name added where two share a run, and the whole path where even that repeats."""
    def short(path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem

    names = [short(Path(p)) for p in paths]
    names = [f"{n}/{Path(p).name}" if names.count(n) > 1 else n for n, p in zip(names, paths)]
    return [p if names.count(n) > 1 else n for n, p in zip(names, paths)]


def output_dir(cfg) -> Path:
    """``out_dir``, or by default the run directory of the first checkpoint."""
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    return default_out_dir(cfg.ckpt_path if isinstance(cfg.ckpt_path, str) else cfg.ckpt_path[0])


def default_out_dir(ckpt_path: str) -> Path:
    """The run directory of a checkpoint (``<run>`` for ``<run>/checkpoints/x.ckpt``), else its folder."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def certify(cfg) -> dict[str, dict]:
    """Certify every checkpoint of ``cfg.ckpt_path``; write certify.json, .md and .png into the
    output folder (``cfg.out_dir``, or the first checkpoint's run directory); return the results."""
    paths = checkpoint_paths(cfg)
    pyplot()  # certify.png is written last: a missing extra is one line now, not after the work
    torch.manual_seed(cfg.seed)
    results = {}
    for name, path in zip(_names(paths), paths):
        started = time.perf_counter()
        loaded = load_run(cfg, path)
        if callable(getattr(loaded.saved.net, "certificate", None)):
            result = certify_language_model(cfg, loaded)
        else:
            result = certify_classifier(cfg, loaded)
        result["seconds"] = time.perf_counter() - started
        results[name] = result
    out = output_dir(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "certify.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "certify.md").write_text(markdown(results) + "\n")
        plot(results, out / "certify.png")
    except OSError as error:
        raise ConfigError(f"out_dir {str(out)!r} cannot be written ({error.strerror or error})") from None
    return results


# ----------------------------------------------------------------------------- reports


def markdown(results: dict[str, dict]) -> str:
    """The table the command prints and writes to certify.md."""
    lines = []
    classifiers = {k: v for k, v in results.items() if v["kind"] == "classifier"}
    if classifiers:
        radii = next(iter(classifiers.values()))["radii"]
        head = ["checkpoint", "run", "bound (RMS)", "bound (l2)", "lower bound (RMS)", "bound / lower",
                *[f"certified / PGD acc at {r['radius_x255']:.4g}/255" for r in radii], "acc fp32 / bf16 / fp8 weights",
                "bound (RMS) bf16 / fp8 weights"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for name, r in classifiers.items():
            w = r["weights"]
            cells = [name, r["run"], f"{r['bound_rms']:.4g}", f"{r['bound_l2']:.4g}", f"{r['lower_bound']:.4g}",
                     f"{r['bound_over_lower_bound']:.4g}x",
                     *[f"{row['certified_acc']:.1%} / {row['empirical_acc']:.1%}" for row in r["radii"]],
                     f"{w['float32']['accuracy']:.1%} / {w['bfloat16']['accuracy']:.1%} / {w['float8_e4m3']['accuracy']:.1%}",
                     f"{w['bfloat16']['bound_rms']:.4g} / {w['float8_e4m3']['bound_rms']:.4g}"]
            lines.append("| " + " | ".join(cells) + " |")
        attacked = {name: r["autoattack"] for name, r in classifiers.items() if r.get("autoattack")}
        if attacked:
            lines += ["", "| checkpoint | points | radius | certified | PGD | AutoAttack | broken by AutoAttack only / PGD only |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {name} | {a['examples']} | {a['radius_x255']:.4g}/255 | {a['certified_acc']:.1%} | {a['pgd_acc']:.1%} | "
                      f"{a['autoattack_acc']:.1%} | {a['broken_by_autoattack_only']} / {a['broken_by_pgd_only']} |" for name, a in attacked.items()]
    for name, r in results.items():
        if r["kind"] != "language_model":
            continue
        if lines:
            lines.append("")
        lines += [f"{name} ({r['run']}): certified bound {r['bound']:.4g} for inputs of token RMS <= {r['input_radius']:.3g} "
                  f"(the paper's formula, not a certificate: {r['bound_paper_formula']:.4g}); observed on {r['batches_observed']} validation batches", "",
                  "| block | activation RMS: certified | observed | attention abs logit: certified | observed |",
                  "| --- | --- | --- | --- | --- |"]
        for b in r["blocks"]:
            lines.append(f"| {b['block']} | {b['activation_rms_certified']:.4g} | {b['activation_rms_observed']:.4g} | "
                         f"{b['attention_logit_certified']:.4g} | {b['attention_logit_observed']:.4g} |")
        at = r.get("at_radius")
        if at:
            lines += ["", f"at token-RMS radius {at['radius']:.4g} around the embedded text: certified bound {at['bound']:.4g} for "
                          f"inputs of token RMS <= {at['input_radius']:.4g}; {at['certified_acc']:.2%} of {at['positions']} "
                          f"next-token predictions certified (margin > {at['margin']:.4g}), {at['accuracy']:.2%} correct"]
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """Classifiers: certified accuracy against l2 radius (one line per checkpoint) with the PGD
    accuracy at the attacked radii (dots), and certified accuracy at the first radius against clean
    accuracy (one point per checkpoint: the robustness each run bought, and at what price).
    Language models: per block, certified bounds (solid) and observed maxima (dashed)."""
    plt = pyplot()
    classifiers = {k: v for k, v in results.items() if v["kind"] == "classifier"}
    models = {k: v for k, v in results.items() if v["kind"] == "language_model"}
    count = 2 * bool(classifiers) + bool(models)
    figure, panels = plt.subplots(1, count, figsize=(7 * count, 4.8), squeeze=False)
    panels = list(panels[0])
    if classifiers:
        axes = panels.pop(0)
        for name, r in classifiers.items():
            label = f"{name} ({r['run']})" if r["run"] else name
            (line,) = axes.plot([e * 255 for e in r["curve"]["radius"]], r["curve"]["certified_acc"], label=label)
            axes.plot([row["radius_x255"] for row in r["radii"]], [row["empirical_acc"] for row in r["radii"]], "o", color=line.get_color())
        axes.set(xlabel="l2 radius in units of 1/255 (pixels in [0, 1], 3072 values)", ylabel="accuracy on the test split",
                 title="certified accuracy (lines) and accuracy under PGD (dots)", ylim=(0, None))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        axes = panels.pop(0)
        for name, r in classifiers.items():
            first = r["radii"][0]
            axes.scatter([100 * r["accuracy"]], [100 * first["certified_acc"]], label=f"{name} ({r['run']})" if r["run"] else name)
        radius = classifiers[next(iter(classifiers))]["radii"][0]["radius_x255"]
        axes.set(xlabel="clean accuracy on the test split (%)", ylabel=f"certified accuracy at l2 {radius:.4g}/255 (%)",
                 title="what each run's bound certifies, against its accuracy", ylim=(0, None))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    if models:
        axes = panels.pop(0)
        for name, r in models.items():
            blocks = [b["block"] for b in r["blocks"]]
            for key, marker in (("activation_rms", "o"), ("attention_logit", "s")):
                (line,) = axes.plot(blocks, [b[f"{key}_certified"] for b in r["blocks"]], marker + "-", label=f"{name}: {key} certified")
                axes.plot(blocks, [b[f"{key}_observed"] for b in r["blocks"]], marker + "--", color=line.get_color(), label=f"{name}: {key} observed")
        axes.set(xlabel="block", yscale="log", title="per block: certified bound (solid), largest observed (dashed)",
                 xticks=sorted({b["block"] for r in models.values() for b in r["blocks"]}))
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(cfg) -> dict[str, dict]:
    """The command: certify, print the table and where the files went; a user's error is one line
    ``error: ...`` on stderr and exit status 1, a broken certificate one such line and status 2."""
    from lipschitz_lightning.commands.cli import quiet_known_warnings

    quiet_known_warnings()
    started = time.perf_counter()
    try:
        results = certify(cfg)
    except LipschitzLightningError as error:
        exit_with(error, EXIT_CERTIFICATE_BROKEN if isinstance(error, CertificateBroken) else EXIT_BAD_INPUT)
    out = output_dir(cfg)
    print(markdown(results), flush=True)
    print(f"\nwritten: {out / 'certify.json'}, {out / 'certify.md'}, {out / 'certify.png'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    from lipschitz_lightning.commands.cli import command_main

    command_main("certify", argv)


if __name__ == "__main__":
    main()
