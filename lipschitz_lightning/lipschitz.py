"""The documented Python API of the bounds, kept where the README has always shown it: the
functions live in ``lipschitz_lightning.core.bounds`` (docs/api.md, docs/certificate.md)."""

from lipschitz_lightning.core.bounds import (
    GELU_DIVISOR,
    GELU_MAX_SLOPE,
    SYNC_FREE_SQUARINGS,
    UNCERTIFIABLE_SUBSTITUTES,
    GPTCertificate,
    at_least,
    at_most,
    embedding_norm,
    embedding_norm_on_device,
    gpt_bound_paper_formula,
    gpt_certificate,
    head_row_distances,
    mlp_bound,
    rms_norm,
    rms_norm_on_device,
)

__all__ = [
    "rms_norm", "rms_norm_on_device", "embedding_norm", "embedding_norm_on_device", "SYNC_FREE_SQUARINGS",
    "mlp_bound", "head_row_distances", "GPTCertificate", "gpt_certificate", "gpt_bound_paper_formula", "at_least", "at_most",
    "GELU_DIVISOR", "GELU_MAX_SLOPE", "UNCERTIFIABLE_SUBSTITUTES",
]
