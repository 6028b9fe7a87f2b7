"""Weight constraints (SPEC §4, §6): projections that keep a weight matrix in a norm ball.

Pure torch, no Lightning. Every function takes and returns tensors and batches over leading
dimensions (a stack of matrices has shape ``(..., fanout, fanin)``).

Two layers of API:

- bare matrix functions (``orthogonalize``, ``soft_cap``, ``spectral_hammer`` ...) act on ``M``
  exactly as written in SPEC §6, with no ``scale`` or ``w_max`` rescaling;
- a constraint is a class (``Constraint``: ``SpectralSoftCap``, ``SpectralNormalize``, ...) that
  holds its settings and declares what it needs; ``conf/constraint/<name>.yaml`` names it as its
  ``_target_``. Calling one on a stack applies the SPEC's units (act on ``W / scale``, or on
  ``W / (scale * w_max)`` for the methods that cap at 1); ``project_linear`` does it for one layer.

Adding a constraint is one subclass and one yaml file, in the user's own module and config folder
(docs/constraints.md).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from lipschitz_lightning.core.linalg import (
    POLYNOMIAL_FORMS,
    RowShard,
    _is_wide,
    _rank_one,
    layer_scale,
    ns_max_singular_value,
    odd_polynomial_bound,
    odd_polynomial_steps,
    orthogonalize,
    sigma_upper_bound,
    spectral_norms,
    top_singular_triplet,
)
from lipschitz_lightning.core.types import Positive, PositiveInt, UnitInterval

# --------------------------------------------------------------------------------------------
# Bare matrix functions (SPEC §6 table; no scale, no w_max rescaling)
# --------------------------------------------------------------------------------------------

HARD_CAP_COEFFICIENTS = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)


def hard_cap(M: Tensor, form: str = "auto", shard: RowShard | None = None) -> Tensor:
    """Polynomial approximation of ``min(1, sigma)`` on every singular value."""
    transpose = not _is_wide(M, shard)
    X = M.mT if transpose else M
    X = odd_polynomial_steps(X, HARD_CAP_COEFFICIENTS, form, shard)
    return X.mT if transpose else X


def soft_cap(M: Tensor, alpha: float | Tensor, form: str = "auto", shard: RowShard | None = None) -> Tensor:
    """Two polynomial steps that pull large singular values down: ``s - a s^3`` then ``s + a s^3``."""
    transpose = not _is_wide(M, shard)
    X = M.mT if transpose else M
    X = odd_polynomial_steps(X, ((1.0, -alpha, 0.0), (1.0, alpha, 0.0)), form, shard)
    return X.mT if transpose else X


def svd_cap(M: Tensor, w_max: float | Tensor, shard: RowShard | None = None) -> Tensor:
    """Exact ``U diag(min(s, w_max)) V^T``: slow, the ground truth. A tensor ``w_max`` of shape
    ``(matrices, 1)`` caps each matrix of a stack at its own value. Split (``shard``): the same map
    as ``M V diag(min(1, w_max / s)) V^T`` from the summed Gram matrix's eigenvectors, in float64."""
    if M.dtype in (torch.bfloat16, torch.float16):  # no 16-bit SVD: compute in float32, round after
        return svd_cap(M.float(), w_max.float() if isinstance(w_max, Tensor) else w_max, shard).to(M.dtype)
    if shard is not None:
        X = M.double()
        eigenvalues, V = torch.linalg.eigh(shard.sum(X.mT @ X))
        s = eigenvalues.clamp(min=0).sqrt()
        cap = w_max.double() if isinstance(w_max, Tensor) else w_max
        factor = torch.where(s > cap, cap / s.clamp(min=1e-300), torch.ones_like(s))
        return (((X @ V) * factor.unsqueeze(-2)) @ V.mT).to(M.dtype)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * S.clamp(max=w_max).unsqueeze(-2)) @ Vh


def spectral_normalize(M: Tensor, iters: int = 16, state: Tensor | None = None, shard: RowShard | None = None) -> Tensor:
    """``M / max(1, sigma_max)`` with ``sigma_max`` from power iteration (Miyato et al. 2018)."""
    _, sigma, _ = top_singular_triplet(M, iters, state, shard)
    return M / sigma.clamp(min=1.0)[..., None, None]


def spectral_hammer(M: Tensor, w_max: float, iters: int = 16, state: Tensor | None = None, shard: RowShard | None = None) -> Tensor:
    """Set the largest singular value to exactly ``w_max``; the others are left alone."""
    u, sigma, v = top_singular_triplet(M, iters, state, shard)
    return M + (w_max - sigma)[..., None, None] * _rank_one(u, v)


def spectral_weight_decay(M: Tensor, strength: float, iters: int = 16, state: Tensor | None = None,
                          shard: RowShard | None = None) -> Tensor:
    """Decay only the top singular value: ``M - strength * sigma u v^T``."""
    u, sigma, v = top_singular_triplet(M, iters, state, shard)
    return M - (strength * sigma)[..., None, None] * _rank_one(u, v)


@functools.lru_cache(maxsize=4096)
def soft_cap_coupling(w_max: float, wd: float, max_update_norm: float) -> float:
    """The soft cap strength ``alpha`` that maps a singular value ``k`` exactly to ``w_max`` (§6.1).

    ``k = w_max (1 - wd) + max_update_norm`` is the largest singular value a weight at most
    ``w_max`` can reach after the decay and one step; ``alpha`` is the smallest real non-negative
    root of ``-k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 + (k - w_max)``, or 1 when there is none.
    Cached: with a constant learning rate every step asks for the same few values.
    """
    k = w_max * (1.0 - wd) + max_update_norm
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - w_max])
    real = roots.real[(np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))) & (roots.real >= 0)]
    return float(real.min()) if real.size else 1.0


def soft_cap_is_monotone(alpha: float, k: float) -> bool:
    """The soft cap's guarantee (a singular value <= k ends <= w_max) needs its scalar map
    ``s -> (s - a s^3) + a (s - a s^3)^3`` increasing on [0, k]: ``a k^2 <= 1/3``. Past that, a
    singular value below k can end above w_max."""
    return alpha * k * k <= 1 / 3


# The hard cap's polynomial explodes past its range (p(5) ~ 6e126): a matrix whose top singular
# value may exceed this takes the exact cap instead. Below it the output's singular values are
# proven at most hard_cap_bound() (1.0109; the polynomial also dips to -1.0109 near 4).
HARD_CAP_SAFE_SIGMA = 4.0


@functools.lru_cache(maxsize=None)
def hard_cap_bound() -> float:
    """The largest singular value the hard cap can output for inputs of spectral norm at most
    ``HARD_CAP_SAFE_SIGMA`` (in ``w_max`` units), proven by ``odd_polynomial_bound``."""
    return odd_polynomial_bound(HARD_CAP_COEFFICIENTS, HARD_CAP_SAFE_SIGMA)


# --------------------------------------------------------------------------------------------
# Embeddings (SPEC §4, §6.2)
# --------------------------------------------------------------------------------------------


def normalize_token_vectors(E: Tensor, inflation: float = 1.0, dim: int = -1) -> Tensor:
    """``e / max(1/inflation, rms(e))`` for every token vector ``e`` along ``dim``.

    With ``inflation = 1`` this is the embedding projection of §6.2 (token RMS at most 1);
    with the inflation factor it is Muon's embedding dualization of §4.
    """
    rms = E.pow(2).mean(dim=dim, keepdim=True).sqrt()
    return E / rms.clamp(min=1.0 / inflation)


def project_embedding(E: Tensor, w_max: float = 1.0, dim: int = -1) -> Tensor:
    """Pull every token vector back to RMS at most ``w_max`` (§6.2)."""
    return normalize_token_vectors(E / w_max, 1.0, dim) * w_max


# --------------------------------------------------------------------------------------------
# A constraint: one class per method, named by conf/constraint/<name>.yaml's _target_
# --------------------------------------------------------------------------------------------


@dataclass
class StackStep:
    """What a constraint may read about a stack of same-shape matrices and the optimizer step they
    just took, one entry per matrix of the stack (``Constraint.project``'s second argument)."""

    caps: tuple[float, ...]  # each matrix's w_max in RMS->RMS units (the head's may be its own)
    lr_t: tuple[float, ...] = ()  # lr * t of the step (SPEC §5's target norm t)
    wd_eff: tuple[float, ...] = ()  # wd * lr * t of the step
    # the spectral norm of the step direction per unit lr * t (Muon's Newton-Schulz bound), in
    # W / scale units; None where the step has no such bound (Adam's)
    step_bound: tuple[float | None, ...] = ()
    scale: float = 1.0  # sqrt(fanout / fanin) of the (whole) matrix
    power_state: Tensor | None = None  # (matrices, smaller side): power iteration's warm starts, updated in place
    shard: RowShard | None = None  # the stack is some rows of one matrix split across processes
    # set by a guarded method: per matrix, True where its guarantee failed and the exact cap ran instead
    fell_back: Tensor | None = None


class Constraint:
    """What happens to every weight matrix after every optimizer step (SPEC §3 step 4, §6).

    A method is a subclass with a ``project(M, step)``: ``M`` a stack of same-shape matrices
    ``(matrices, fanout, fanin)`` in the method's units, ``step`` the ``StackStep``. What it needs
    is declared on the class: ``caps_at_one`` (``M = W / (scale * w_max)``, the method caps at 1;
    else ``M = W / scale``, RMS->RMS units), ``power_iteration`` (a power-iteration vector per matrix
    is kept between steps, in ``step.power_state``), ``polynomial`` (evaluated in ``dtype``). The
    units are applied around ``project`` by ``__call__``; ``core.projection.Projection`` applies a
    constraint to a whole model. A user's constraint is one subclass and one yaml file naming it
    (docs/constraints.md).

    ``w_max`` caps every hidden matrix, ``head_w_max`` the output layer (None: ``w_max``),
    ``embed_w_max`` every token vector's RMS.
    """

    name: ClassVar[str]  # the option's name in conf/constraint/ (labels, messages)
    caps_at_one: ClassVar[bool] = False
    power_iteration: ClassVar[bool] = False
    polynomial: ClassVar[bool] = False
    starts_in_ball: ClassVar[bool] = True  # a matrix above its cap is scaled to it before the first step
    active: ClassVar[bool] = True  # False: the unconstrained baseline, which touches nothing

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0):
        self.w_max, self.embed_w_max = w_max, embed_w_max
        self.head_w_max = w_max if head_w_max is None else head_w_max
        self.dtype: torch.dtype | None = None  # a polynomial method's working precision (None: as given)
        self.power_iters = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # MyClip -> "my_clip"
            cls.name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def cap(self, head: bool) -> float:
        return self.head_w_max if head else self.w_max

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        raise NotImplementedError

    def __call__(self, W: Tensor, step: StackStep) -> Tensor:
        """``project`` on the stack ``W`` with the SPEC's units around it (SPEC §6)."""
        unit = _per_matrix(step.caps, W) * step.scale if self.caps_at_one else step.scale
        M = W / unit
        if self.dtype is not None:
            return self.project(M.to(self.dtype), step).to(W.dtype) * unit
        return self.project(M, step) * unit

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None and k != "dtype")
        return f"{type(self).__name__}({settings})"


class NoConstraint(Constraint):
    """The unconstrained baseline: nothing is projected (weight decay is the only regulariser). The
    caps are accepted, and unused, so that a model's config can set them for any constraint."""

    name = "none"
    active = False
    starts_in_ball = False

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return M


class SvdCap(Constraint):
    """Exact ``min(sigma, w_max)`` from an SVD: slow, the ground truth."""

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return svd_cap(M, _per_matrix(step.caps, M, trailing=1), step.shard)


class SpectralNormalize(Constraint):
    """``W / max(1, ||W||_rms / w_max)``, the norm from power iteration (Miyato et al. 2018).

    ``power_iters``: 256 iterations on the small Gram matrix; measured, not proven: a first (cold)
    call on a nearly flat spectrum overshoots ``w_max`` by up to 0.49%, warm-started calls converge;
    the paper's 16 from a random start overshoot it by up to 3% (docs/constraints.md)."""

    caps_at_one = True
    power_iteration = True

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0,
                 power_iters: PositiveInt = 256):
        super().__init__(w_max, head_w_max, embed_w_max)
        self.power_iters = power_iters

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return spectral_normalize(M, self.power_iters, step.power_state, step.shard)


class _Polynomial(Constraint):
    """A method that is a polynomial in ``M M^T``, evaluated in ``dtype`` (float32, or bfloat16 as the
    paper's NanoGPT run: every projected weight then rounded to bfloat16, a rounding that is
    measured, not bounded) and in ``polynomial_form`` (``odd_polynomial_steps``)."""

    polynomial = True

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0,
                 polynomial_form: Literal[POLYNOMIAL_FORMS] = "auto", dtype: Literal[PROJECTION_DTYPES] = "float32"):
        super().__init__(w_max, head_w_max, embed_w_max)
        self.polynomial_form = polynomial_form
        self.dtype = None if dtype == "float32" else getattr(torch, dtype)


class SpectralSoftCap(_Polynomial):
    """Singular values pulled down by two polynomial steps whose strength is coupled to the step
    (SPEC §6.1): with Muon and ``coupling="exact"`` every matrix ends at most ``w_max`` (the proof:
    docs/constraints.md). ``coupling="reference"`` is the paper's ``u = lr t / scale``, for bit-parity
    only. ``guard`` (on by default; off reproduces the paper's code exactly) takes the exact cap
    where the guarantee would fail: a scalar map not monotone on ``[0, k]``, or a step with no
    spectral bound that took a matrix past ``k``."""

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0,
                 coupling: Literal[COUPLINGS] = "exact", polynomial_form: Literal[POLYNOMIAL_FORMS] = "auto",
                 dtype: Literal[PROJECTION_DTYPES] = "float32", guard: bool = True):
        super().__init__(w_max, head_w_max, embed_w_max, polynomial_form, dtype)
        self.coupling, self.guard = coupling, guard

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        bounded = [bound is not None for bound in step.step_bound]
        # u of §6.1 per matrix; a step with no spectral bound counts as lr * t and is checked below
        u = [max_update_norm(lr_t, step.scale, self.coupling, 1.0 if bound is None else bound)
             for lr_t, bound in zip(step.lr_t, step.step_bound)]
        beyond = [False] * M.shape[0]
        if self.guard and not all(bounded):
            sigma = spectral_norms(M, step.shard).tolist()
            beyond = [not ok and s > w * (1 - wd) + x for s, ok, w, wd, x in zip(sigma, bounded, step.caps, step.wd_eff, u)]
        alphas, fallback = [], []
        for w_max, wd_eff, x, far in zip(step.caps, step.wd_eff, u, beyond):
            k = w_max * (1 - wd_eff) + x
            if self.coupling == "exact" and k <= w_max and not far:
                # decay outweighs the step: nothing can leave the ball, and the coupling's fallback
                # alpha = 1 (no root) would inflate every singular value above 1
                alphas.append(0.0), fallback.append(False)
                continue
            alpha = soft_cap_coupling(w_max, wd_eff, x)
            unsafe = far or (self.guard and not soft_cap_is_monotone(alpha, k))
            alphas.append(0.0 if unsafe else alpha), fallback.append(unsafe)
        out = soft_cap(M, _per_matrix(alphas, M), self.polynomial_form, step.shard) if any(alphas) else M
        # decided on the host from the step's floats: counting them never waits for the device
        step.fell_back = torch.tensor(fallback, dtype=torch.bool)
        return _exact_cap_rows(M, out, fallback, step.caps, step.shard)


class SpectralHardCap(_Polynomial):
    """A polynomial approximation of ``min(w_max, sigma)`` on every singular value: at most 1.0109
    ``w_max`` for inputs up to 4 ``w_max`` in exact arithmetic (proven, ``hard_cap_bound``; float32
    adds ~1e-7, bfloat16 up to ~1%: measured, docs/constraints.md); ``guard`` sends a matrix that may
    lie beyond (a rigorous upper bound on its norm) to the exact cap, where the polynomial explodes."""

    caps_at_one = True

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0,
                 polynomial_form: Literal[POLYNOMIAL_FORMS] = "auto", dtype: Literal[PROJECTION_DTYPES] = "float32",
                 guard: bool = True):
        super().__init__(w_max, head_w_max, embed_w_max, polynomial_form, dtype)
        self.guard = guard

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        if not self.guard:
            return hard_cap(M, self.polynomial_form, step.shard)
        # the one guard that reads the device every step: which branch to take depends on the weights
        fits = (sigma_upper_bound(M, step.shard) <= HARD_CAP_SAFE_SIGMA).cpu()  # False for inf and nan too
        step.fell_back = ~fits
        if bool(fits.all()):
            return hard_cap(M, self.polynomial_form, step.shard)
        out = torch.empty_like(M)
        out[~fits] = svd_cap(M[~fits], 1.0, step.shard)  # M is W / (scale * w_max) here: the cap is 1
        if bool(fits.any()):
            out[fits] = hard_cap(M[fits], self.polynomial_form, step.shard)
        return out


class Orthogonalize(_Polynomial):
    """Every singular value set to about ``w_max`` by Newton-Schulz (the scaled Stiefel manifold),
    at most 0.99934 ``w_max`` in exact arithmetic (proven; float32 rounding measured, +2e-7)."""

    caps_at_one = True

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return orthogonalize(M, form=self.polynomial_form, shard=step.shard)


class SpectralHammer(Constraint):
    """The largest singular value that power iteration finds is set to ``w_max`` (also where it was
    below); the others are left alone, so this is no ball: the next ones can grow past it."""

    power_iteration = True

    def __init__(self, w_max: Positive = 1.0, head_w_max: Positive | None = None, embed_w_max: Positive = 1.0,
                 power_iters: PositiveInt = 16):
        super().__init__(w_max, head_w_max, embed_w_max)
        self.power_iters = power_iters

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return spectral_hammer(M, _per_matrix(step.caps, M, trailing=0), self.power_iters, step.power_state, step.shard)


class SpectralWeightDecay(Constraint):
    """The largest singular value shrinks by ``1 - spectral_wd`` each step: no ball (``w_max`` and
    ``head_w_max`` are accepted, so that a model's config can set them for any constraint, and unused)."""

    power_iteration = True
    starts_in_ball = False

    def __init__(self, spectral_wd: UnitInterval = 0.1, power_iters: PositiveInt = 16, w_max: Positive = 1.0,
                 head_w_max: Positive | None = None, embed_w_max: Positive = 1.0):
        super().__init__(w_max, head_w_max, embed_w_max)
        self.spectral_wd, self.power_iters = spectral_wd, power_iters

    def project(self, M: Tensor, step: StackStep) -> Tensor:
        return spectral_weight_decay(M, self.spectral_wd, self.power_iters, step.power_state, step.shard)


# the constraints this project ships, by their option names (conf/constraint/<name>.yaml)
BUILT_IN: dict[str, type[Constraint]] = {cls.name: cls for cls in (
    NoConstraint, SvdCap, SpectralNormalize, SpectralSoftCap, SpectralHardCap, Orthogonalize, SpectralHammer, SpectralWeightDecay,
)}


def _per_matrix(values, like: Tensor, trailing: int = 2) -> float | Tensor:
    """Per-matrix floats as something that broadcasts over a stack: a plain float when they are all
    equal (the usual case: no host-to-device copy, which on a GPU would wait for the queue), else a
    tensor of shape ``(matrices,) + (1,) * trailing``."""
    if len(set(values)) == 1:
        return float(values[0])
    tensor = torch.tensor(values, dtype=like.dtype)
    if like.is_cuda:
        tensor = tensor.pin_memory().to(like.device, non_blocking=True)
    return tensor.view(-1, *(1,) * trailing)


def _exact_cap_rows(M: Tensor, result: Tensor, rows: list[bool], caps: tuple[float, ...], shard: RowShard | None = None) -> Tensor:
    """``result`` with the chosen matrices of the stack replaced by their exact cap ``min(s, cap)``."""
    if not any(rows):
        return result
    mask = torch.tensor(rows, dtype=torch.bool, device=M.device)
    chosen = [cap for cap, row in zip(caps, rows) if row]
    result = result.clone()
    result[mask] = svd_cap(M[mask], torch.tensor(chosen, dtype=M.dtype, device=M.device).view(-1, 1), shard)
    return result


PROJECTION_DTYPES = ("float32", "bfloat16")
COUPLINGS = ("exact", "reference")


def max_update_norm(lr_t: float, scale: float, coupling: str, update_sigma_max: float | None = None) -> float:
    """``u`` of §6.1: the largest spectral norm one optimizer step can have, in ``W / scale`` units.

    ``exact``: Muon's step is ``lr * t * orth(buf)`` in these units, and Newton-Schulz output has
    spectral norm at most ``update_sigma_max`` (default: the small coefficients' proven bound), so
    this is a true bound. ``reference``: the paper's code, ``lr * t / scale``; it is not a bound
    when ``scale > 1`` (``fanout > fanin``) and kept only for bit-parity.
    """
    if coupling == "exact":
        return lr_t * (ns_max_singular_value("small") if update_sigma_max is None else update_sigma_max)
    if coupling == "reference":
        return lr_t / scale
    raise ValueError(f"constraint.coupling must be one of {list(COUPLINGS)}, got {coupling!r}")


# --------------------------------------------------------------------------------------------
# One layer or one stack, outside a training run
# --------------------------------------------------------------------------------------------

MUON_STEP = "muon"  # project_stack's default step bound: Muon's with the small-model coefficients


def project_stack(W: Tensor, constraint: Constraint, *, lr_t: float | tuple[float, ...] = 0.0,
                  wd_eff: float | tuple[float, ...] = 0.0, step_bound: float | None | str = MUON_STEP,
                  power_state: Tensor | None = None, caps: tuple[float, ...] | None = None) -> tuple[Tensor, Tensor]:
    """``constraint`` on a stack of same-shape weights ``(matrices, fanout, fanin)`` after a step of
    ``lr_t`` (``lr * t``) and ``wd_eff`` (one for all, or one per matrix). Returns the projected stack
    and, per matrix, whether a guard applied the exact cap instead.

    ``step_bound``: the spectral norm of the step per unit ``lr * t`` (default: Muon's, the proven
    bound of the small-model Newton-Schulz); None for a step with no such bound (Adam's), which the
    guarded methods then check matrix by matrix. ``caps``: each matrix's ``w_max`` (default:
    ``constraint.w_max``). ``power_state``: ``(matrices, smaller side)``, updated in place.
    """
    count = W.shape[0]
    bound = ns_max_singular_value("small") if step_bound == MUON_STEP else step_bound
    step = StackStep(
        caps=tuple(caps) if caps is not None else (constraint.w_max,) * count,
        lr_t=_each(lr_t, count), wd_eff=_each(wd_eff, count), step_bound=(bound,) * count,
        scale=layer_scale(W), power_state=power_state, fell_back=torch.zeros(count, dtype=torch.bool),
    )
    if not constraint.active:
        return W, step.fell_back
    return constraint(W, step), step.fell_back


def project_linear(W: Tensor, constraint: Constraint, *, lr_t: float = 0.0, wd_eff: float = 0.0,
                   step_bound: float | None | str = MUON_STEP, power_state: Tensor | None = None) -> Tensor:
    """``constraint`` on one layer's weight ``W`` of shape ``(fanout, fanin)`` (or a stack
    ``(..., fanout, fanin)`` sharing one ``w_max`` and step); see ``project_stack``. A guarded
    method with ``guard=False`` reproduces the paper's code exactly, also where its guarantee fails."""
    stack = W.reshape(-1, *W.shape[-2:])
    state = None if power_state is None else power_state.view(stack.shape[0], -1)  # a view: updated in place
    projected, _ = project_stack(stack, constraint, lr_t=lr_t, wd_eff=wd_eff, step_bound=step_bound, power_state=state)
    return projected.reshape(W.shape)


def _each(value, count: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count
