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
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from lipschitz_lightning.commands.certify import (
    EXIT_BAD_INPUT,
    EXIT_CERTIFICATE_BROKEN,
    CertificateBroken,
    _names,
    checkpoint_paths,
    frozen,
    output_dir,
    run_label,
    validation_set,
)
from lipschitz_lightning.commands.runs import Loaded, load_run
from lipschitz_lightning.errors import ConfigError, DataError, LipschitzLightningError, exit_with
from lipschitz_lightning.robustness import quantize as Q
from lipschitz_lightning.robustness.certified import SLACK

FILES = ("quantize.json", "quantize.md")


def top_two_margin(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The prediction and its margin over the runner-up (what a certified-unchanged prediction must clear)."""
    top = logits.topk(2, dim=-1).values
    return logits.argmax(dim=-1), top[..., 0] - top[..., 1]


class Tally:
    """One scheme's sums over the evaluated inputs (examples or positions)."""

    def __init__(self):
        self.count = self.loss = self.correct = self.changed = 0.0
        self.certified = self.certified_global = 0.0
        self.per_input: list[Tensor] = []
        self.observed_max = self.observed_over_bound = 0.0

    def add(self, logits: Tensor, targets: Tensor, reference_prediction: Tensor) -> None:
        flat = logits.reshape(-1, logits.shape[-1])
        self.count += targets.numel()
        self.loss += float(F.cross_entropy(flat.float(), targets.reshape(-1), reduction="sum"))
        prediction = flat.argmax(dim=-1)
        self.correct += int((prediction == targets.reshape(-1)).sum())
        self.changed += int((prediction != reference_prediction.reshape(-1)).sum())

    def row(self) -> dict:
        return {"loss": self.loss / self.count, "accuracy": self.correct / self.count, "changed": self.changed / self.count}


def check_per_input(where: str, scheme: str, observed: Tensor, bound: Tensor, certified: Tensor, prediction: Tensor,
                    exact_prediction: Tensor) -> None:
    """The certificate's promises on this batch: no change above its per-input bound, no certified
    prediction changed (float64 on the exact side, the deployed network as it runs)."""
    over = observed > bound * (1 + SLACK)
    if over.any():
        i = int(over.nonzero()[0, 0])
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: input {i} moved the logits by {float(observed[i]):.6g} "
                                f"(RMS), above its certified bound {float(bound[i]):.6g}")
    flipped = certified & (prediction != exact_prediction)
    if flipped.any():
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: {int(flipped.sum())} predictions certified "
                                f"unchanged by rounding changed")


def check_every_input(where: str, scheme: str, observed: Tensor, bound: Tensor, certified: Tensor, prediction: Tensor,
                      exact_prediction: Tensor) -> None:
    """The every-input bound's promises on this batch, for the rounded network in exact arithmetic (its
    float64 evaluation, which is what the bound speaks of): no change above it, no prediction it
    certifies unchanged changed."""
    over = observed > bound * (1 + SLACK)
    if over.any():
        i = int(over.nonzero()[0, 0])
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: input {i} moved the logits by {float(observed[i]):.6g} "
                                f"(RMS, rounded network in float64), above the every-input bound {float(bound[i]):.6g} there")
    flipped = certified & (prediction != exact_prediction)
    if flipped.any():
        raise CertificateBroken(f"certificate broken: {where}: {scheme}: {int(flipped.sum())} predictions certified "
                                f"unchanged for every input changed (rounded network in float64)")


# ----------------------------------------------------------------------------- classifiers


def quantize_classifier(cfg, loaded: Loaded, chosen: dict[str, Q.Scheme]) -> dict:
    """The MLP on the validation images: every scheme's accuracy, loss, bounds and certified fraction."""
    where = str(loaded.path)
    net, net64 = frozen(loaded.saved.net), frozen(loaded.saved.net, torch.float64)
    x, y = validation_set(loaded, cfg.examples)
    classes = net.config["num_classes"]
    to_l2 = math.sqrt(2 * classes)  # a margin moves by at most sqrt(2) ||dz||_2 = sqrt(2 classes) rms(dz)
    deployed = {name: Q.quantized(net, scheme) for name, scheme in chosen.items()}
    deployed64 = {name: frozen(rounded, torch.float64) for name, rounded in deployed.items()}
    # per unit RMS of what the first layer sees (the bound is linear in it: docs/quantization.md §2)
    bounds = {name: Q.mlp_rounding_bound_of(net, deployed[name], scheme) for name, scheme in chosen.items()}
    reference, tallies, seconds = Tally(), {name: Tally() for name in chosen}, dict.fromkeys(chosen, 0.0)
    for xs, ys in zip(x.split(cfg.batch), y.split(cfg.batch)):
        with torch.no_grad():
            logits = net(xs)
            exact = net64(xs.double())
        exact_prediction, margin = top_two_margin(exact)
        prediction = logits.argmax(dim=-1)
        reference.add(logits, ys, prediction)
        input_rms = Q.rms(Q.first_layer_input(net64, xs))
        for name in chosen:
            started = time.perf_counter()
            rounded, per_input = Q.mlp_per_input(net64, deployed[name], xs)
            seconds[name] += time.perf_counter() - started
            observed = Q.rms(rounded.double() - exact)
            certified = margin > to_l2 * per_input
            check_per_input(where, name, observed, per_input, certified, rounded.argmax(dim=-1), exact_prediction)
            every_input = bounds[name].bound * input_rms
            certified_by_bound = margin > to_l2 * every_input * (1 + SLACK)
            with torch.no_grad():
                rounded64 = deployed64[name](xs.double())
            check_every_input(where, name, Q.rms(rounded64 - exact), every_input, certified_by_bound, rounded64.argmax(dim=-1),
                              exact_prediction)
            tally = tallies[name]
            tally.add(rounded, ys, prediction)
            tally.certified += int(certified.sum())
            tally.certified_global += int(certified_by_bound.sum())
            tally.per_input.append(per_input)
            tally.observed_max = max(tally.observed_max, float(observed.max()))
            tally.observed_over_bound = max(tally.observed_over_bound, float((observed / every_input.clamp(min=1e-300)).max()))
    shift = net.input_shift
    domain = (f"every image in [0, 1]^{net.config['input_dim']}: the first layer sees x - {shift:g}, of RMS <= "
              f"{Q.first_layer_input_rms_max(net):g}; per image, the bound times rms(x - {shift:g})") if shift else \
             f"every image in [0, 1]^{net.config['input_dim']} (RMS <= 1); per image, the bound times its RMS"
    return {
        "kind": "classifier", "checkpoint": where, "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)), "examples": len(x),
        "domain": domain,
        "float32": reference.row() | {"changed": 0.0},
        "schemes": {name: scheme_row(chosen[name], tallies[name], bounds[name].bound, bounds[name].covers, bounds[name].terms,
                                     Q.kernels(deployed[name]), seconds[name],
                                     {f"layers.{i}": Q.error_norm(a.weight, b.weight) for i, (a, b) in enumerate(zip(net.layers, deployed[name].layers))})
                    for name in chosen},
    }


def scheme_row(scheme: Q.Scheme, tally: Tally, bound: float, covers: str, terms: dict, kernels: list[str], seconds: float,
               errors: dict) -> dict:
    per_input = torch.cat(tally.per_input)
    return tally.row() | {
        "description": scheme.description,
        "bound": bound, "bound_covers": covers, "bound_terms": terms,
        "per_input_median": float(per_input.median()), "per_input_max": float(per_input.max()),
        "observed_max": tally.observed_max, "observed_over_bound_max": tally.observed_over_bound,
        "certified_unchanged": tally.certified / tally.count, "certified_unchanged_by_bound": tally.certified_global / tally.count,
        "error_norms": errors, "activation_kernel": kernels[0] if len(kernels) == 1 else (kernels or None),
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- language models


def quantize_language_model(cfg, loaded: Loaded, chosen: dict[str, Q.Scheme]) -> dict:
    """The GPT on at most ``max_batches`` validation batches: every position's next-token prediction."""
    where = str(loaded.path)
    net, net64 = frozen(loaded.saved.net), frozen(loaded.saved.net, torch.float64)
    window = net.window_blocks(1.0)
    to_l2 = math.sqrt(2 * net.config.vocab_size)
    deployed = {name: Q.quantized(net, scheme) for name, scheme in chosen.items()}
    deployed64 = {name: frozen(rounded, torch.float64) for name, rounded in deployed.items()}
    bounds = {name: Q.gpt_rounding_bound_of(net, deployed[name], scheme.activations) for name, scheme in chosen.items()}
    reference, tallies, seconds = Tally(), {name: Tally() for name in chosen}, dict.fromkeys(chosen, 0.0)
    batches = 0
    for index, (tokens, targets) in enumerate(loaded.datamodule.val_dataloader()):
        if index >= cfg.max_batches:
            break
        batches += 1
        with torch.no_grad():
            logits = net(tokens, window=window)
            exact = net64(tokens, window=window)
        exact_prediction, margin = top_two_margin(exact)
        prediction = logits.argmax(dim=-1)
        reference.add(logits, targets, prediction)
        for name in chosen:
            started = time.perf_counter()
            rounded, per_input = Q.gpt_per_input(net64, deployed[name], tokens, window)
            seconds[name] += time.perf_counter() - started
            change = Q.rms(rounded.double() - exact)  # (batch, seq): each position's logits
            observed = change.amax(dim=-1)
            certified = margin > to_l2 * per_input[:, None]
            check_per_input(where, name, observed, per_input, certified, rounded.argmax(dim=-1), exact_prediction)
            every_input = torch.full_like(per_input, bounds[name].bound)
            certified_by_bound = margin > to_l2 * bounds[name].bound * (1 + SLACK)
            with torch.no_grad():
                rounded64 = deployed64[name](tokens, window=window)
            check_every_input(where, name, Q.rms(rounded64 - exact).amax(dim=-1), every_input, certified_by_bound,
                              rounded64.argmax(dim=-1), exact_prediction)
            tally = tallies[name]
            tally.add(rounded, targets, prediction)
            tally.certified += int(certified.sum())
            tally.certified_global += int(certified_by_bound.sum())
            tally.per_input.append(per_input)
            tally.observed_max = max(tally.observed_max, float(observed.max()))
            tally.observed_over_bound = max(tally.observed_over_bound, float(observed.max()) / bounds[name].bound)
    if not batches:
        raise DataError(f"{where}: the validation split gave no batch")
    rows = {}
    for name in chosen:
        b = bounds[name]
        terms = {"embedding": b.embedding, **{f"block{l}": t for l, t in enumerate(b.blocks)}, "head": b.head}
        errors = Q.gpt_norms(net, deployed[name])[2]
        rows[name] = scheme_row(chosen[name], tallies[name], b.bound, b.covers, terms, Q.kernels(deployed[name]), seconds[name], errors)
    return {
        "kind": "language_model", "checkpoint": where, "run": run_label(loaded.run_config),
        "step": int(loaded.saved.checkpoint.get("global_step", 0)), "batches": batches, "positions": int(reference.count),
        "domain": f"every token sequence (inputs after the embedding of token RMS <= {bounds[next(iter(chosen))].input_radius:.4g})",
        "certified_lipschitz_bound": net.certified_bound(),
        "float32": reference.row() | {"changed": 0.0},
        "schemes": rows,
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
        else:
            result = quantize_classifier(cfg, loaded, chosen)
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
