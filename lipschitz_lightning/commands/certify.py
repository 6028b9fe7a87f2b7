"""What the certified bound buys, for any checkpoint: certified against attacked robustness, how
tight the bound is, what low-precision weights cost; for a language model, each block's certified
activation and attention-logit bounds against what the validation data reaches.

    python -m lipschitz_lightning.certify ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.certify 'ckpt_path=[<run a>/checkpoints/last.ckpt,<run b>/checkpoints/last.ckpt]' out_dir=certified

It writes ``certify.json``, ``certify.md`` (the table it also prints) and ``certify.png`` into
``out_dir``; by default (``out_dir=null``) into the run directory of the first checkpoint
(``<run>/`` for ``<run>/checkpoints/last.ckpt``), beside its ``summary.json``. It creates no other
directory. Settings are in ``conf/certify.yaml``.

Classifiers: the maths is in ``lipschitz_lightning.robustness`` (``classifier.classifier_report``:
what this command reports, radius by radius; ``certified``: margins and radii in l2 pixel units;
``attacks``: PGD and the lower-bound search; ``precision``: rounded weights). Here: which images,
which settings, the files.

Language models (``model=gpt``)
-------------------------------
The certificate of docs/certificate.md (``net.certificate()``) and, per block, its bounds on the
largest activation RMS and on the largest ``|pre-softmax logit|`` next to the largest values the
network reaches on the validation split (``robustness.observe``). An observed value above its
certified bound fails the command.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from lipschitz_lightning.commands.extras import available, install_line, needs, pyplot
from lipschitz_lightning.commands.runs import Loaded, load_run
from lipschitz_lightning.core.types import parse_radius
from lipschitz_lightning.data.common import evaluation_examples
from lipschitz_lightning.errors import (
    CertificateBroken,
    ConfigError,
    LipschitzLightningError,
    exit_with,
)
from lipschitz_lightning.robustness.classifier import (
    Attack,
    AutoAttack,
    LowerBoundSearch,
    classifier_report,
)
from lipschitz_lightning.robustness.observe import language_model_report, next_tokens_at_radius
from lipschitz_lightning.robustness.precision import frozen


# Exit status of the command: 1 for a setting, checkpoint or data the user can fix, 2 for a broken certificate.
EXIT_BAD_INPUT, EXIT_CERTIFICATE_BROKEN = 1, 2


# ----------------------------------------------------------------------------- the command


def checkpoint_paths(cfg) -> list[str]:
    """What the settings' types cannot say, checked before anything is loaded (the types are
    ``settings.CertifySettings``'s, or ``QuantizeSettings``' for quantize); returns the checkpoint paths."""
    paths = [cfg.ckpt_path] if isinstance(cfg.ckpt_path, str) else list(cfg.ckpt_path)
    for path in paths:  # all of them before any work (load_network says the same of a file it cannot read)
        if not Path(path).is_file():
            raise ConfigError(f"ckpt_path must be an existing checkpoint file, got {path!r}")
    autoattack = getattr(cfg, "autoattack", None)  # certify's, not quantize's
    if autoattack is not None and autoattack.examples > 0 and not available("torchattacks"):
        raise ConfigError(f"autoattack.examples={cfg.autoattack.examples}: AutoAttack needs torchattacks: {install_line('torchattacks')} "
                          f"(README.md says why without its dependencies); or give autoattack.examples=0")
    out = output_dir(cfg)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"out_dir {str(out)!r} cannot be written: {str(existing)!r} is not a writable folder")
    return [str(p) for p in paths]


def run_label(run_config: dict) -> str:
    try:
        from lipschitz_lightning.config.tradeoff import describe

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


def certify_classifier(cfg, loaded: Loaded) -> dict:
    """The classifier's report (``robustness.classifier.classifier_report``) on the first ``examples``
    test images, with the settings of ``conf/certify.yaml``."""
    x, y = evaluation_examples(loaded.datamodule, cfg.examples)
    autoattack = None
    if cfg.autoattack.examples > 0:
        attack = needs("torchattacks", "AutoAttack needs torchattacks").AutoAttack
        autoattack = AutoAttack(attack, cfg.autoattack.examples, cfg.autoattack.version)
    report = classifier_report(
        loaded.saved.net, x, y, radii=cfg.radii, autoattack=autoattack, curve_max_radius=cfg.curve_max_radius, seed=cfg.seed,
        attack=Attack(cfg.attack.steps, cfg.attack.restarts, cfg.attack.step_size, cfg.attack.batch),
        lower_bound=LowerBoundSearch(cfg.lower_bound.points, cfg.lower_bound.pairs, cfg.lower_bound.steps, cfg.lower_bound.lr,
                                     cfg.lower_bound.gap),
        where=str(loaded.path),
    )
    return {
        "kind": "classifier",
        "network": type(loaded.saved.net).__name__,
        "checkpoint": str(loaded.path),
        "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)),
        **report,
    }


def certify_language_model(cfg, loaded: Loaded) -> dict:
    """The language model's certificate against what its validation batches reach
    (``robustness.observe.language_model_report``), and its next tokens certified at a radius."""
    net = frozen(loaded.saved.net)
    report = language_model_report(net, loaded.datamodule.val_dataloader(), cfg.max_batches, cfg.stats_tokens, str(loaded.path))
    return {
        "kind": "language_model",
        "checkpoint": str(loaded.path),
        "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)),
        **report,
        "at_radius": at_radius(cfg, net, loaded),
    }


def language_model_radius(cfg, run_config: dict | None) -> float | None:
    """``lm_radius``, or the radius the run's margin loss trained for; None when neither is set."""
    if cfg.lm_radius is not None:
        return parse_radius(cfg.lm_radius)
    radius = ((run_config or {}).get("loss") or {}).get("radius")
    return parse_radius(radius) if radius else None


def at_radius(cfg, net: nn.Module, loaded: Loaded) -> dict | None:
    """The next-token predictions certified at ``language_model_radius`` (``robustness.observe.next_tokens_at_radius``)
    on at most ``max_batches`` validation batches; None where no radius is set."""
    radius = language_model_radius(cfg, loaded.run_config)
    if radius is None:
        return None
    return next_tokens_at_radius(net, loaded.datamodule.val_dataloader(), radius, cfg.max_batches)


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
        local = {name: r for name, r in classifiers.items() if "certified_acc_local" in r["radii"][0]}
        if local:  # a network with a local certificate (the ViT's): docs/certificate.md §9
            lines += ["", "| checkpoint | radius | certified: pair bound / local | local drop smaller than the global, median / least |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {name} | {row['radius_x255']:.4g}/255 | {row['certified_acc']:.1%} / {row['certified_acc_local']:.1%} | "
                      f"{row['local_tightness']['median']:.3g}x / {row['local_tightness']['min']:.3g}x |"
                      for name, r in local.items() for row in r["radii"]]
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
            if at.get("certified_acc_local") is not None:
                lines[-1] += f"; {at['certified_acc_local']:.2%} by the local certificate (docs/certificate.md §9)"
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
