"""What the certified bound buys, for any checkpoint: certified against attacked robustness, how
tight the bound is, what low-precision weights cost; for a language model, each block's certified
activation and attention-logit bounds against what the validation data reaches.

    python -m lipschitz_lightning.certify ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m lipschitz_lightning.certify 'ckpt_path=[<run a>/checkpoints/last.ckpt,<run b>/checkpoints/last.ckpt]' out_dir=certified

It writes ``certify.json``, ``certify.md`` (the table it also prints) and ``certify.png`` into
``out_dir``; by default (``out_dir=null``) into the run directory of the first checkpoint
(``<run>/`` for ``<run>/checkpoints/last.ckpt``), beside its ``summary.json``. It creates no other
directory. Settings are in ``conf/certify.yaml``. Every function above ``# --- the command`` is plain
torch, free of Lightning and Hydra, and tested on its own.

Classifiers (the CIFAR-10 MLP: 3072 flattened pixels in [0, 1] -> 10 logits)
--------------------------------------------------------------------------------
The certified bound ``L`` is in RMS->RMS units (SPEC §2), ``rms(v) = ||v||_2 / sqrt(len v)``:
``rms(f(x) - f(y)) <= L rms(x - y)``. Writing the RMS norms out,

    ||f(x) - f(y)|| / sqrt(10) <= L ||x - y|| / sqrt(3072)   so   ||f(x) - f(y)|| <= L sqrt(10 / 3072) ||x - y||,

that is ``L_l2 = L_rms * sqrt(outputs / inputs) = L_rms * sqrt(10 / 3072)`` in plain l2 pixel units
(``l2_bound``). A logit difference ``f_i - f_j = (e_i - e_j) . f`` then moves by at most
``||e_i - e_j|| ||f(x) - f(y)|| = sqrt(2) L_l2 ||x - y||``, so a correctly classified point whose
margin (true logit minus the largest other) exceeds ``sqrt(2) L_l2 eps`` keeps its class for every
input within l2 distance ``eps``: it is **certified** at radius ``eps`` (``certified``); its
certified radius is ``margin / (sqrt(2) L_l2)`` (``certified_radius``).

- **Empirical robustness**: what a PGD l2 attack (``pgd_l2``) leaves correctly classified. Every
  certified point must survive it. A certified point the attack breaks, confirmed in float64
  (``lipschitz_violation``), refutes the bound: the command fails, naming checkpoint, radius, point.
- **Lower bound** on the Lipschitz constant (RMS units): the largest RMS->RMS norm of the network's
  Jacobian at validation points (``jacobian_norms``: the constant is the supremum of that norm),
  and a gradient ascent over input pairs on ``rms(f(a) - f(b)) / rms(a - b)`` started from the
  points and directions with the largest Jacobian norms (``pair_search``), both evaluated in
  float64. A lower bound above the certified one is again a refutation, and fails the command.
- **Low-precision weights**: accuracy with the weights rounded to bfloat16, and to float8 e4m3 with a
  per-tensor amax scale (``with_weights_cast``), computed in float32, next to float32 itself.

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
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from torch import Tensor, nn

from lipschitz_lightning.errors import ConfigError, DataError, LipschitzLightningError, exit_with


class CertificateBroken(LipschitzLightningError):
    """An attack, a search or the data went past what the certificate guarantees: a bug, never a result."""


# Exit status of the command: 1 for a setting, checkpoint or data the user can fix, 2 for a broken certificate.
EXIT_BAD_INPUT, EXIT_CERTIFICATE_BROKEN = 1, 2

# Relative slack for comparing a value found in float64 with a bound computed from float64 norms:
# far above the rounding of either, far below anything a wrong bound would show.
SLACK = 1e-6


# ----------------------------------------------------------------------------- margins and radii


def l2_bound(rms_bound: float, inputs: int, outputs: int) -> float:
    """The Lipschitz bound in plain l2 units, ``||f(x) - f(y)|| <= L_l2 ||x - y||``, from the one in
    RMS units: ``L_l2 = L_rms * sqrt(outputs / inputs)`` (``sqrt(10 / 3072)`` for CIFAR-10; see the
    module's docstring for the two lines of algebra)."""
    return rms_bound * math.sqrt(outputs / inputs)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit of the true class minus the largest other logit: positive when correctly classified."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def certified_radius(margin: Tensor, bound_l2: float) -> Tensor:
    """The l2 radius within which no input can change the class: ``margin / (sqrt(2) L_l2)``, 0 for
    a misclassified point."""
    return margin.clamp(min=0) / (math.sqrt(2) * bound_l2)


def certified(margin: Tensor, bound_l2: float, eps: float) -> Tensor:
    """Points that no input within l2 distance ``eps`` can misclassify: ``margin > sqrt(2) L_l2 eps``."""
    return margin > math.sqrt(2) * bound_l2 * eps


# ----------------------------------------------------------------------------- the attack


def _per_point(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *(1,) * (like.ndim - 1))


def project_l2(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """``delta`` back into the l2 ball of radius ``eps``, then ``x + delta`` into the pixel box ``[0, 1]``
    (clipping to the box only shortens ``delta``, so the result is in both)."""
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    delta = delta * _per_point((eps / norms).clamp(max=1.0), delta)
    return (x + delta).clamp(0, 1) - x


def pgd_l2(
    net: nn.Module, x: Tensor, labels: Tensor, eps: float, *, steps: int, restarts: int,
    step_size: float = 2.5, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A PGD l2 attack on the margin: ``steps`` normalised-gradient steps of length
    ``step_size * eps / steps``, each projected onto the l2 ball of radius ``eps`` and the pixel box.
    The first start is the clean point, each further restart a random point of the ball's surface.

    Returns ``(broken, delta)``: which points some iterate misclassified (margin <= 0), and for those
    the first perturbation that did (zeros for the others). A point leaves the attack as soon as it
    is broken.
    """
    broken = torch.zeros(len(x), dtype=torch.bool)
    found = torch.zeros_like(x)
    alpha = step_size * eps / steps
    for restart in range(restarts):
        active = (~broken).nonzero()[:, 0]
        delta = torch.zeros_like(x[active])
        if restart:
            delta = project_l2(torch.randn(delta.shape, generator=generator).to(delta) * eps, x[active], eps)
        for step in range(steps + 1):
            if not len(active):
                break
            xs = x[active]
            delta.requires_grad_(True)
            margin = margins(net(xs + delta), labels[active])
            hit = margin.detach() <= 0
            found[active[hit]] = delta.detach()[hit]
            broken[active[hit]] = True
            if step == steps:
                break
            (grad,) = torch.autograd.grad(-margin.sum(), delta)
            with torch.no_grad():
                keep = ~hit
                grad, delta, xs, active = grad[keep], delta.detach()[keep], xs[keep], active[keep]
                norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                delta = project_l2(delta + alpha * grad / _per_point(norms, grad), xs, eps)
    return broken, found


@torch.no_grad()
def lipschitz_violation(net64: nn.Module, x: Tensor, delta: Tensor, label: Tensor, bound_l2: float) -> dict | None:
    """Re-check, in float64, whether ``x`` and ``x + delta`` contradict the bound: the margin fell by
    more than ``sqrt(2) L_l2 ||delta||``. Returns the numbers when it did, else None (a float32
    rounding artefact of the attack, not a contradiction)."""
    x64, d64 = x.double()[None], delta.double()[None]
    before, after = (float(margins(net64(point), label.view(1))) for point in (x64, x64 + d64))
    distance = float(d64.norm())
    allowed = math.sqrt(2) * bound_l2 * distance
    if before - after > allowed * (1 + SLACK):
        return {"margin_before": before, "margin_after": after, "l2_distance": distance, "allowed_drop": allowed}
    return None


# ----------------------------------------------------------------------------- lower bounds


def rms(v: Tensor) -> Tensor:
    """Per-row RMS of a batch."""
    return v.flatten(1).pow(2).mean(dim=1).sqrt()


def jacobians(net: nn.Module, x: Tensor, chunk: int = 250) -> Tensor:
    """The network's Jacobians at the points ``x``: ``(N, outputs, inputs)``."""
    jacobian = torch.func.vmap(torch.func.jacrev(lambda point: net(point[None])[0]))
    return torch.cat([jacobian(part).flatten(2) for part in x.split(chunk)])


def jacobian_norms(net: nn.Module, x: Tensor, chunk: int = 250) -> tuple[Tensor, Tensor]:
    """The RMS->RMS norm ``sqrt(inputs / outputs) sigma_max(J)`` of the Jacobian at each point, and its
    top right singular vector (the input direction it stretches most), in the dtype of ``net``.

    The Lipschitz constant is the supremum of this norm over inputs, so each value is a lower bound.
    """
    norms, directions = [], []
    for part in x.split(chunk):
        J = jacobians(net, part, chunk)
        outputs, inputs = J.shape[1:]
        # from the small (outputs x outputs) Gram matrix J J^T: sigma_max^2 and the top left vector u;
        # the right one is J^T u / sigma_max
        eigenvalues, U = torch.linalg.eigh(J @ J.transpose(1, 2))
        sigma = eigenvalues[:, -1].clamp(min=0).sqrt()
        directions.append((J.transpose(1, 2) @ U[:, :, -1:])[:, :, 0] / sigma.clamp(min=1e-30)[:, None])
        norms.append(sigma * math.sqrt(inputs / outputs))
    return torch.cat(norms).detach(), torch.cat(directions).detach()


@torch.no_grad()
def rms_ratio(net: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``rms(f(a) - f(b)) / rms(a - b)`` per pair (in the dtype of ``net`` and the points)."""
    return rms(net(a) - net(b)) / rms(a - b)


def pair_search(
    net: nn.Module, net64: nn.Module, start: Tensor, direction: Tensor, *, steps: int, lr: float, gap: float,
) -> tuple[float, int]:
    """Gradient ascent (Adam, in float32) on ``rms(f(a) - f(b)) / rms(a - b)`` over pairs kept in the
    pixel box, from ``a = start``, ``b = start + gap * direction`` (``rms(b - a) = gap`` before the
    box). Every pair each row reaches is a valid witness, so the best one of each row is kept and
    evaluated again in float64 (float32 loses digits in ``f(a) - f(b)`` for close pairs).

    Returns the largest float64 ratio and the row that reached it.
    """
    start, direction = start.detach(), direction.detach().reshape(start.shape)
    direction = direction / _per_point(rms(direction).clamp(min=1e-30), direction)
    a = start.clone().float().requires_grad_(True)
    b = (start + gap * direction).clamp(0, 1).float().requires_grad_(True)
    best_a, best_b = a.detach().clone(), b.detach().clone()
    best = torch.full((len(start),), -1.0)
    search = torch.optim.Adam([a, b], lr=lr)
    for step in range(steps + 1):
        ratio = rms(net(a) - net(b)) / rms(a - b).clamp(min=1e-12)
        better = ratio.detach() > best
        best_a[better], best_b[better], best[better] = a.detach()[better], b.detach()[better], ratio.detach()[better]
        if step == steps:
            break
        search.zero_grad()
        (-ratio.sum()).backward()
        search.step()
        with torch.no_grad():
            a.clamp_(0, 1), b.clamp_(0, 1)
    exact = torch.nan_to_num(rms_ratio(net64, best_a.double(), best_b.double()), nan=0.0)
    row = int(exact.argmax())
    return float(exact[row]), row


# ----------------------------------------------------------------------------- low-precision weights

FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def cast_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to ``dtype`` and back to its own dtype. For float8 e4m3 the tensor is first
    divided by a per-tensor scale that maps its largest magnitude onto the format's largest value
    (448), and multiplied back after (the amax scaling of fp8 training recipes); without it the
    RMS-scaled weights (entries around 1e-2) would lose most of e4m3's 3 mantissa bits to subnormals."""
    if dtype == torch.float8_e4m3fn:
        scale = t.abs().max().clamp(min=torch.finfo(torch.float32).tiny) / FLOAT8_MAX
        return (t / scale).to(dtype).to(t.dtype) * scale
    return t.to(dtype).to(t.dtype)


def with_weights_cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``net`` whose parameters went through ``dtype`` (``cast_tensor``); it computes in float32."""
    cast = copy.deepcopy(net)
    with torch.no_grad():
        for p in cast.parameters():
            p.copy_(cast_tensor(p, dtype))
    return cast


# ----------------------------------------------------------------------------- language models


@torch.no_grad()
def observe_language_model(net: nn.Module, batches, max_batches: int, stats_tokens: int) -> dict[str, float]:
    """The largest value of every statistic ``net(tokens, stats=...)`` records, over at most
    ``max_batches`` validation batches (each cut to its first ``stats_tokens`` tokens: the model is
    causal, so these are the values those tokens have in the full pass)."""
    observed: dict[str, float] = {}
    window = net.window_blocks(1.0) if hasattr(net, "window_blocks") else None
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        stats: dict = {}
        net(tokens[:, :stats_tokens], stats=stats, window=window)
        for name, value in stats.items():
            observed[name] = max(observed.get(name, -math.inf), float(value))
    return observed


def compare_blocks(certificate, observed: dict[str, float]) -> list[dict]:
    """Per block: the certified activation-RMS and |logit| bounds next to the observed maxima."""
    rows = []
    for l, (activation, logit) in enumerate(zip(certificate.activation_rms, certificate.attention_logit)):
        rows.append({
            "block": l,
            "activation_rms_certified": activation,
            "activation_rms_observed": observed[f"activation/rms_max_block{l}"],
            "attention_logit_certified": logit,
            "attention_logit_observed": observed[f"attention/max_abs_logit_{l}"],
            "attention_logit_observed_signed_max": observed[f"attention/max_logit_{l}"],
        })
    return rows


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


@dataclass
class Loaded:
    path: Path
    saved: object  # checkpoints.SavedNetwork
    run_config: dict
    datamodule: object


def validate_settings(cfg) -> list[str]:
    """Every setting checked before anything is loaded; returns the checkpoint paths."""
    from omegaconf import ListConfig, OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path must name a checkpoint, or a list of them: ckpt_path=<run>/checkpoints/last.ckpt or 'ckpt_path=[a.ckpt,b.ckpt]'")
    paths = list(cfg.ckpt_path) if isinstance(cfg.ckpt_path, (list, tuple, ListConfig)) else [cfg.ckpt_path]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"ckpt_path must name at least one checkpoint file, got {OmegaConf.to_container(cfg, resolve=False)['ckpt_path']!r}")
    radii = cfg.radii
    if not isinstance(radii, (list, tuple, ListConfig)) or not radii or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in radii
    ):
        shown = OmegaConf.to_container(radii) if isinstance(radii, ListConfig) else radii
        raise ConfigError(f"radii must be a list of l2 radii > 0 (pixels in [0, 1], e.g. [0.1412,0.2824]), got {shown!r}")
    for key in ("attack.steps", "attack.restarts", "attack.batch", "lower_bound.points", "lower_bound.pairs",
                "lower_bound.steps", "max_batches", "stats_tokens"):
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    for key in ("attack.step_size", "lower_bound.lr", "lower_bound.gap", "curve_max_radius"):
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be a number > 0, got {value!r}")
    if cfg.examples is not None and not (isinstance(cfg.examples, int) and not isinstance(cfg.examples, bool) and cfg.examples >= 1):
        raise ConfigError(f"examples must be an integer >= 1, or null for the whole validation split, got {cfg.examples!r}")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    for path in paths:  # all of them before any work (load_network says the same of a file it cannot read)
        if not Path(path).is_file():
            raise ConfigError(f"ckpt_path must be an existing checkpoint file, got {path!r}")
    out = Path(cfg.out_dir) if cfg.out_dir is not None else default_out_dir(paths[0])
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"out_dir {str(out)!r} cannot be written: {str(existing)!r} is not a writable folder")
    return [str(p) for p in paths]


def load(cfg, ckpt_path: str) -> Loaded:
    """The checkpoint's network and its run's validation data, with this command's ``paths.*`` and
    ``data.*`` on top (as ``evaluate``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lipschitz_lightning.checkpoints import load_network
    from lipschitz_lightning.config import validate_config
    from lipschitz_lightning.evaluate import data_config

    saved = load_network(ckpt_path)
    run_config = saved.checkpoint.get("run_config")
    if not run_config or "data" not in run_config:
        raise ConfigError(f"ckpt_path {ckpt_path!r} carries no run config, so its validation data is unknown; train it again")
    data = data_config(cfg, run_config["data"])
    if "model" in run_config:
        validate_config(OmegaConf.create({"model": run_config["model"], "data": data}))
    datamodule = instantiate(data)
    datamodule.prepare_data()  # missing data: the one-line error of train.py
    datamodule.setup("validate")
    vocab = getattr(datamodule, "vocab", None)
    if saved.vocab and vocab is not None and getattr(vocab, "chars", saved.vocab) != saved.vocab:
        raise DataError(f"the text in {data.data_dir} has another vocabulary than the checkpoint {ckpt_path!r}: it is not the data the run trained on")
    return Loaded(Path(ckpt_path), saved, run_config, datamodule)


def validation_set(loaded: Loaded, limit: int | None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` validation examples (all when None), as the module sees them."""
    xs, ys, count = [], [], 0
    for batch in loaded.datamodule.val_dataloader():
        x, y = loaded.datamodule.on_after_batch_transfer(batch, 0)
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
        from lipschitz_lightning.tradeoff import describe

        label = describe(run_config)
        return label.pair + (f", w_max {label.w_max:g}" if label.w_max is not None else "")
    except (KeyError, TypeError, AttributeError):
        return ""


def certify_classifier(cfg, loaded: Loaded) -> dict:
    where = str(loaded.path)
    net, net64 = frozen(loaded.saved.net), frozen(loaded.saved.net, torch.float64)
    generator = torch.Generator().manual_seed(cfg.seed)
    x, y = validation_set(loaded, cfg.examples)
    with torch.no_grad():
        logits = torch.cat([net(part) for part in x.split(cfg.attack.batch)])
    inputs, outputs = x[0].numel(), logits.shape[1]
    bound = float(net.certified_bound())
    bound_l2 = l2_bound(bound, inputs, outputs)
    margin = margins(logits, y)
    correct = margin > 0
    timings = {}

    # certified vs attacked, radius by radius (ascending: a point broken at a radius is broken at every larger one)
    started = time.perf_counter()
    radii = sorted(set(float(r) for r in cfg.radii))
    broken = ~correct  # a misclassified point needs no attack
    rows, rounding_only = [], 0
    for eps in radii:
        safe = certified(margin, bound_l2, eps)
        attacked = (~broken).nonzero()[:, 0]
        for part in attacked.split(cfg.attack.batch):
            hit, delta = pgd_l2(net, x[part], y[part], eps, steps=cfg.attack.steps, restarts=cfg.attack.restarts,
                                step_size=cfg.attack.step_size, generator=generator)
            for i in (safe[part] & hit).nonzero()[:, 0].tolist():
                index = int(part[i])
                violation = lipschitz_violation(net64, x[index], delta[i], y[index], bound_l2)
                if violation is None:
                    rounding_only += 1  # flipped in float32 only; float64 says the bound holds
                    hit[i] = False
                    continue
                raise CertificateBroken(
                    f"certificate broken: {where}: PGD flipped validation point {index} within l2 radius {eps:.6g} "
                    f"({eps * 255:.4g}/255), where the certified bound {bound:.6g} (RMS units) forbids it: margin "
                    f"{violation['margin_before']:.6g} -> {violation['margin_after']:.6g} over l2 distance "
                    f"{violation['l2_distance']:.6g}, more than the certified drop {violation['allowed_drop']:.6g} (float64)"
                )
            broken[part[hit]] = True
        survivors = ~broken
        assert not (safe & ~survivors).any()  # certified <= empirical, point by point (checked above)
        rows.append({"radius": eps, "radius_x255": eps * 255, "certified_acc": float(safe.float().mean()),
                     "empirical_acc": float(survivors.float().mean()), "certified_points": int(safe.sum()),
                     "surviving_points": int(survivors.sum())})
    timings["attack_s"] = time.perf_counter() - started

    # the lower bound: Jacobian norms at validation points, then a pair search from the steepest of them
    started = time.perf_counter()
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
    timings["lower_bound_s"] = time.perf_counter() - started

    precision = {"float32": {"accuracy": float(correct.float().mean()), "bound_rms": bound}}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float8_e4m3", torch.float8_e4m3fn)):
        cast = with_weights_cast(net, dtype)
        with torch.no_grad():
            predictions = torch.cat([cast(part) for part in x.split(cfg.attack.batch)]).argmax(dim=1)
        precision[name] = {"accuracy": float((predictions == y).float().mean()), "bound_rms": float(cast.certified_bound())}

    grid = torch.linspace(0, cfg.curve_max_radius, 201)
    radius = certified_radius(margin, bound_l2)
    curve = [float((correct & (radius > eps)).float().mean()) for eps in grid.tolist()]
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
        "accuracy": float(correct.float().mean()),
        "median_certified_radius": float(radius.median()),
        "radii": rows,
        "attack": {"steps": cfg.attack.steps, "restarts": cfg.attack.restarts, "step_size": cfg.attack.step_size,
                   "float32_only_flips_of_certified_points": rounding_only},
        "lower_bound": lower,
        "lower_bound_jacobian": jacobian_best,
        "lower_bound_pair_search": searched,
        "lower_bound_points": len(sample),
        "bound_over_lower_bound": bound / lower if lower > 0 else math.inf,
        "weights": precision,
        "curve": {"radius": grid.tolist(), "certified_acc": curve},
        "timings": timings,
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
    }


def _names(paths: list[str]) -> list[str]:
    """Short unique names: a checkpoint's run directory (``<run>/checkpoints/last.ckpt`` -> ``<run>``),
    with the file's name added where two share a run, and the whole path where even that repeats."""
    def short(path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem

    names = [short(Path(p)) for p in paths]
    names = [f"{n}/{Path(p).name}" if names.count(n) > 1 else n for n, p in zip(names, paths)]
    return [p if names.count(n) > 1 else n for n, p in zip(names, paths)]


def default_out_dir(ckpt_path: str) -> Path:
    """The run directory of a checkpoint (``<run>`` for ``<run>/checkpoints/x.ckpt``), else its folder."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def certify(cfg) -> dict[str, dict]:
    """Certify every checkpoint of ``cfg.ckpt_path``; write certify.json, .md and .png into the
    output folder (``cfg.out_dir``, or the first checkpoint's run directory); return the results."""
    paths = validate_settings(cfg)
    torch.manual_seed(cfg.seed)
    results = {}
    for name, path in zip(_names(paths), paths):
        started = time.perf_counter()
        loaded = load(cfg, path)
        if callable(getattr(loaded.saved.net, "certificate", None)):
            result = certify_language_model(cfg, loaded)
        else:
            result = certify_classifier(cfg, loaded)
        result["seconds"] = time.perf_counter() - started
        results[name] = result
    out = Path(cfg.out_dir) if cfg.out_dir is not None else default_out_dir(paths[0])
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
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """Classifiers: certified accuracy against l2 radius (one line per checkpoint) with the PGD
    accuracy at the attacked radii (dots). Language models: per block, certified bounds (solid)
    and observed maxima (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifiers = {k: v for k, v in results.items() if v["kind"] == "classifier"}
    models = {k: v for k, v in results.items() if v["kind"] == "language_model"}
    count = bool(classifiers) + bool(models)
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
    started = time.perf_counter()
    try:
        results = certify(cfg)
    except LipschitzLightningError as error:
        exit_with(error, EXIT_CERTIFICATE_BROKEN if isinstance(error, CertificateBroken) else EXIT_BAD_INPUT)
    out = Path(cfg.out_dir) if cfg.out_dir is not None else default_out_dir(validate_settings(cfg)[0])
    print(markdown(results), flush=True)
    print(f"\nwritten: {out / 'certify.json'}, {out / 'certify.md'}, {out / 'certify.png'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="certify")
def main(cfg) -> None:
    from lipschitz_lightning.cli import quiet_known_warnings

    quiet_known_warnings()
    run(cfg)


if __name__ == "__main__":
    main()
