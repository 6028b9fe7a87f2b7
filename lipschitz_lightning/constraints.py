"""The documented Python API of the constraints, kept where the README has always shown it: the
constraint maps and classes live in ``lipschitz_lightning.core.constraints``, Newton-Schulz and
power iteration in ``lipschitz_lightning.core.linalg`` (docs/api.md)."""

from lipschitz_lightning.core.constraints import (
    BUILT_IN,
    COUPLINGS,
    HARD_CAP_COEFFICIENTS,
    HARD_CAP_SAFE_SIGMA,
    MUON_STEP,
    PROJECTION_DTYPES,
    Constraint,
    NoConstraint,
    Orthogonalize,
    SpectralHammer,
    SpectralHardCap,
    SpectralNormalize,
    SpectralSoftCap,
    SpectralWeightDecay,
    StackStep,
    SvdCap,
    hard_cap,
    hard_cap_bound,
    max_update_norm,
    normalize_token_vectors,
    project_embedding,
    project_linear,
    project_stack,
    soft_cap,
    soft_cap_coupling,
    soft_cap_is_monotone,
    spectral_hammer,
    spectral_normalize,
    spectral_weight_decay,
    svd_cap,
)
from lipschitz_lightning.core.linalg import (
    GRAM_RESTART,
    NS_COEFFICIENTS,
    POLYNOMIAL_FORMS,
    POWER_ITERATION_SEED,
    RowShard,
    layer_scale,
    ns_max_singular_value,
    odd_polynomial_bound,
    odd_polynomial_steps,
    orthogonalize,
    random_start_vector,
    sigma_upper_bound,
    spectral_norms,
    top_singular_triplet,
)

__all__ = [
    # the bare matrix functions (SPEC §6: no scale, no w_max)
    "hard_cap", "soft_cap", "svd_cap", "spectral_normalize", "spectral_hammer", "spectral_weight_decay", "orthogonalize",
    "normalize_token_vectors", "project_embedding",
    # the soft cap's coupling and the hard cap's proven range
    "soft_cap_coupling", "soft_cap_is_monotone", "max_update_norm", "hard_cap_bound", "HARD_CAP_COEFFICIENTS",
    "HARD_CAP_SAFE_SIGMA", "COUPLINGS", "PROJECTION_DTYPES",
    # a constraint: one class per method, applied with the SPEC's units
    "Constraint", "StackStep", "BUILT_IN", "NoConstraint", "SvdCap", "SpectralNormalize", "SpectralSoftCap", "SpectralHardCap",
    "Orthogonalize", "SpectralHammer", "SpectralWeightDecay", "project_linear", "project_stack", "MUON_STEP",
    # Newton-Schulz and power iteration (core.linalg)
    "NS_COEFFICIENTS", "POLYNOMIAL_FORMS", "GRAM_RESTART", "odd_polynomial_steps", "odd_polynomial_bound",
    "ns_max_singular_value", "POWER_ITERATION_SEED", "random_start_vector", "top_singular_triplet", "sigma_upper_bound",
    "spectral_norms", "layer_scale", "RowShard",
]
