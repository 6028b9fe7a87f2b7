"""Low precision with a certified bound: what rounding a checkpoint's weights (and activations)
costs, and how far the bound lets rounding move the logits.

    python -m lipschitz_lightning.quantize ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.quantize 'ckpt_path=[<run a>/checkpoints/last.ckpt,<run b>/checkpoints/last.ckpt]' out_dir=quantized

For every checkpoint and scheme (``robustness.quantize.schemes``: int8 per output channel, fp8 e4m3
per tensor, int4 in groups of 128, fp8 weights with fp8 activations) it reports, on the validation
split (a classifier: all its test images by default, as ``certify`` does; a language model: at
most ``max_batches`` batches):

- the loss and accuracy of the rounded network against float32's, and how many predictions changed;
- the certified bound on the logits' change, for every input of the domain (docs/quantization.md);
- the per-input bound (each layer's worst case replaced by the difference the rounded network made
  on that input), and the fraction of predictions it certifies unchanged (margin of the float
  network > ``sqrt(2)`` times the bound in l2 units), also from the every-input bound.

A logit change above its per-input bound, or a prediction certified unchanged that changed, is a
broken certificate: the command stops with exit status 2 (as ``certify``). The every-input bound is
checked the same way against the rounded network evaluated in float64 (it speaks of exact
arithmetic, docs/quantization.md §0). It writes
``quantize.json`` and ``quantize.md`` (the table, also printed) into ``out_dir``, by default the first
checkpoint's run directory, and nothing else. Settings: ``conf/quantize.yaml``.

The rounding, the bounds and the checks are ``robustness.quantize``'s (``classifier_rounding``,
``language_model_rounding``); here: which checkpoints and data, which schemes, the files.
"""

from __future__ import annotations

import json
import time

from lipschitz_lightning.commands.certify import (
    EXIT_BAD_INPUT,
    EXIT_CERTIFICATE_BROKEN,
    _names,
    checkpoint_paths,
    output_dir,
    run_label,
)
from lipschitz_lightning.commands.runs import Loaded, load_run
from lipschitz_lightning.data.common import evaluation_examples
from lipschitz_lightning.errors import CertificateBroken, ConfigError, LipschitzLightningError, exit_with
from lipschitz_lightning.models import MLP
from lipschitz_lightning.robustness import quantize as Q

FILES = ("quantize.json", "quantize.md")


def quantize_classifier(cfg, loaded: Loaded, chosen: dict[str, Q.Scheme]) -> dict:
    """The MLP on the first ``examples`` test images (``robustness.quantize.classifier_rounding``)."""
    where = str(loaded.path)
    x, y = evaluation_examples(loaded.datamodule, cfg.examples)
    return {
        "kind": "classifier", "checkpoint": where, "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)), "examples": len(x),
        **Q.classifier_rounding(loaded.saved.net, x, y, chosen, cfg.batch, where),
    }


def quantize_language_model(cfg, loaded: Loaded, chosen: dict[str, Q.Scheme]) -> dict:
    """The GPT on at most ``max_batches`` validation batches (``robustness.quantize.language_model_rounding``)."""
    where = str(loaded.path)
    return {
        "kind": "language_model", "checkpoint": where, "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)),
        **Q.language_model_rounding(loaded.saved.net, loaded.datamodule.val_dataloader(), chosen, cfg.max_batches, where),
    }


# ----------------------------------------------------------------------------- the command


def chosen_schemes(cfg) -> dict[str, Q.Scheme]:
    available = Q.schemes(cfg.int4_group)
    names = list(dict.fromkeys(cfg.schemes))  # in the order given, once each
    return {name: available[name] for name in names}


def quantize(cfg) -> dict[str, dict]:
    """Quantize every checkpoint of ``cfg.ckpt_path`` in every scheme of ``cfg.schemes``; write
    quantize.json and quantize.md into the output folder; return the results."""
    paths = checkpoint_paths(cfg)
    chosen = chosen_schemes(cfg)
    results = {}
    for name, path in zip(_names(paths), paths):
        started = time.perf_counter()
        loaded = load_run(cfg, path)
        if callable(getattr(loaded.saved.net, "certificate", None)):
            result = quantize_language_model(cfg, loaded, chosen)
        elif isinstance(loaded.saved.net, MLP):
            result = quantize_classifier(cfg, loaded, chosen)
        else:  # the ViT: no rounding bound is derived for its attention (docs/quantization.md covers the MLP and the GPT)
            raise ConfigError(f"ckpt_path {path!r} holds a {type(loaded.saved.net).__name__}: quantize certifies the rounding of "
                              f"model=mlp and model=gpt only; nothing was written")
        result["seconds"] = time.perf_counter() - started
        results[name] = result
    out = output_dir(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / FILES[0]).write_text(json.dumps(results, indent=2) + "\n")
        (out / FILES[1]).write_text(markdown(results) + "\n")
    except OSError as error:
        raise ConfigError(f"out_dir {str(out)!r} cannot be written ({error.strerror or error})") from None
    return results


def markdown(results: dict[str, dict]) -> str:
    """The table the command prints and writes to quantize.md: one row per checkpoint and scheme."""
    head = ["checkpoint", "run", "scheme", "loss: float32 -> rounded", "accuracy: float32 -> rounded", "predictions changed",
            "certified bound (RMS of the logits' change, every input)", "per-input bound: median / max", "largest change seen",
            "certified unchanged: per-input / every-input bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        base = r["float32"]
        for scheme, s in r["schemes"].items():
            lines.append("| " + " | ".join([
                name, r["run"], scheme, f"{base['loss']:.4f} -> {s['loss']:.4f}", f"{base['accuracy']:.2%} -> {s['accuracy']:.2%}",
                f"{s['changed']:.2%}", f"{s['bound']:.4g}", f"{s['per_input_median']:.4g} / {s['per_input_max']:.4g}",
                f"{s['observed_max']:.4g}", f"{s['certified_unchanged']:.2%} / {s['certified_unchanged_by_bound']:.2%}",
            ]) + " |")
    notes = sorted({f"{name}: {r['kind'].replace('_', ' ')}, {r.get('examples', r.get('positions'))} "
                    f"{'images' if r['kind'] == 'classifier' else 'positions'}; bound's domain: {r['domain']}" for name, r in results.items()})
    return "\n".join(lines + [""] + notes)


def run(cfg) -> dict[str, dict]:
    """The command: a user's error is one line ``error: ...`` and exit status 1, a broken certificate
    one such line and status 2."""
    from lipschitz_lightning.commands.cli import quiet_known_warnings

    quiet_known_warnings()
    started = time.perf_counter()
    try:
        results = quantize(cfg)
    except LipschitzLightningError as error:
        exit_with(error, EXIT_CERTIFICATE_BROKEN if isinstance(error, CertificateBroken) else EXIT_BAD_INPUT)
    out = output_dir(cfg)
    print(markdown(results), flush=True)
    print(f"\nwritten: {out / FILES[0]}, {out / FILES[1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    from lipschitz_lightning.commands.cli import command_main

    command_main("quantize", argv)


if __name__ == "__main__":
    main()
