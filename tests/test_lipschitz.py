"""Tests of ``lipschitz_lightning.core.bounds``: norms in the SPEC's units (§2) and the bounds (§7)."""

from __future__ import annotations

import math

import pytest
import torch

from lipschitz_lightning.core import bounds as Lip

GELU_MAX_SLOPE = 1.1289  # SPEC §7, written out rather than read from the package


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --------------------------------------------------------------------------------------------
# rms_norm, embedding_norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16), (1, 7), (7, 1)])
def test_rms_norm_is_scaled_top_singular_value(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fanout, fanin = shape
    expected = math.sqrt(fanin / fanout) * float(torch.linalg.svdvals(W.double())[0])
    assert Lip.rms_norm(W) == pytest.approx(expected, rel=1e-5)


def test_rms_norm_is_gain_from_rms_to_rms():
    # the top right singular vector is the input with the largest RMS gain
    W = torch.randn(24, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(W)
    x = Vh[0]
    rms = lambda t: float(t.pow(2).mean().sqrt())
    assert Lip.rms_norm(W) == pytest.approx(rms(W @ x) / rms(x), rel=1e-5)


def test_rms_norm_of_a_stack_is_its_largest_member():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(3, 12, 7, generator=gen)
    W[1] *= 5
    expected = math.sqrt(7 / 12) * float(torch.linalg.svdvals(W.double()).max())
    assert Lip.rms_norm(W) == pytest.approx(expected, rel=1e-5)


def test_rms_norm_accepts_parameters_and_low_precision():
    W = torch.nn.Parameter(torch.randn(8, 5, generator=torch.Generator().manual_seed(3)))
    expected = math.sqrt(5 / 8) * float(torch.linalg.svdvals(W.detach().double())[0])
    assert isinstance(Lip.rms_norm(W), float)
    assert Lip.rms_norm(W) == pytest.approx(expected, rel=1e-5)
    assert Lip.rms_norm(W.detach().bfloat16()) == pytest.approx(expected, rel=2e-2)


def test_embedding_norm_small_table():
    # rows are tokens; RMS of (3, 4) is 5 / sqrt(2)
    E = torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.0, 0.0]])
    assert Lip.embedding_norm(E) == pytest.approx(5 / math.sqrt(2), rel=1e-6)


def test_embedding_norm_random_table():
    E = torch.randn(65, 16, generator=torch.Generator().manual_seed(4))
    expected = float((E.double().norm(dim=1) / math.sqrt(16)).max())
    assert Lip.embedding_norm(E) == pytest.approx(expected, rel=1e-6)


def test_embedding_norm_of_unit_rms_tokens_is_one():
    E = torch.randn(30, 8, generator=torch.Generator().manual_seed(5))
    E = E / E.pow(2).mean(dim=1, keepdim=True).sqrt()
    assert Lip.embedding_norm(E) == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------------------------
# certified bounds against the paper's implementation
# --------------------------------------------------------------------------------------------


def test_mlp_bound_matches_reference(ref_mlp_bound):
    bound = Lip.mlp_bound(ref_mlp_bound["rms_to_rms_norms"])
    assert bound == pytest.approx(ref_mlp_bound["bound"], rel=1e-9)


def test_mlp_bound_final_scale_multiplies(ref_mlp_bound):
    bound = Lip.mlp_bound(ref_mlp_bound["rms_to_rms_norms"], final_scale=0.25)
    assert bound == pytest.approx(0.25 * ref_mlp_bound["bound"], rel=1e-9)


def test_gpt_bound_matches_reference(ref_transformer_bound):
    entry = ref_transformer_bound
    bound = Lip.gpt_bound_paper_formula(entry["rms_to_rms_norms"], entry["num_blocks"], entry["softmax_scale"])
    assert bound == pytest.approx(entry["bound"], rel=1e-9)


# --------------------------------------------------------------------------------------------
# residual_scale != 1 against SPEC §7 re-derived in product form
# --------------------------------------------------------------------------------------------


def spec_gpt_bound(norms, num_blocks, softmax_scale=1.0, residual_scale=1.0):
    """SPEC §7 written as products: each residual mix multiplies by ``(1 - a) + a * gain``."""
    a = residual_scale / (2 * num_blocks)
    mix = lambda gain: (1 - a) + a * gain

    def n(name, l):
        return norms[f"{name}{l}"]

    # x_l: the activation-norm bound entering block l's attention
    x = [math.prod(
        mix(n("w", j) * n("v", j) / 3) * mix(n("mlp_out", j) * n("mlp_in", j) / GELU_MAX_SLOPE)
        for j in range(l)
    ) for l in range(num_blocks)]
    attention = [
        (n("w", l) / 3) * (n("v", l) + 2 * n("v", l) * x[l] ** 2 * n("q", l) * n("k", l)) * softmax_scale
        for l in range(num_blocks)
    ]
    mlp = [n("mlp_out", l) * n("mlp_in", l) / GELU_MAX_SLOPE for l in range(num_blocks)]
    blocks = math.prod(mix(attention[l]) * mix(mlp[l]) for l in range(num_blocks))
    return norms["embed"] * blocks * norms["out"]


def test_spec_reimplementation_agrees_with_reference(ref_transformer_bound):
    # validates the re-implementation itself before it is trusted at residual_scale != 1
    entry = ref_transformer_bound
    bound = spec_gpt_bound(entry["rms_to_rms_norms"], entry["num_blocks"], entry["softmax_scale"])
    assert bound == pytest.approx(entry["bound"], rel=1e-9)


@pytest.mark.parametrize("residual_scale", [0.5, 2.0, 3.7])
def test_gpt_bound_residual_scale_matches_spec(ref_transformer_bound, residual_scale):
    entry = ref_transformer_bound
    args = (entry["rms_to_rms_norms"], entry["num_blocks"], entry["softmax_scale"])
    bound = Lip.gpt_bound_paper_formula(*args, residual_scale=residual_scale)
    assert bound == pytest.approx(spec_gpt_bound(*args, residual_scale=residual_scale), rel=1e-9)
    # the residual scale changes the bound: it is really used
    assert bound != pytest.approx(entry["bound"], rel=1e-6)


def _random_gpt_norms(num_blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    names = ["embed", "out"] + [f"{p}{l}" for l in range(num_blocks) for p in ("q", "k", "v", "w", "mlp_in", "mlp_out")]
    values = 0.2 + 3 * torch.rand(len(names), generator=gen, dtype=torch.float64)
    return dict(zip(names, values.tolist()))


@pytest.mark.parametrize("num_blocks", [1, 3, 8])
@pytest.mark.parametrize("softmax_scale", [1.0, 0.5])
@pytest.mark.parametrize("residual_scale", [0.25, 1.5])
def test_gpt_bound_residual_scale_random_norms(num_blocks, softmax_scale, residual_scale):
    norms = _random_gpt_norms(num_blocks, seed=num_blocks)
    bound = Lip.gpt_bound_paper_formula(norms, num_blocks, softmax_scale, residual_scale)
    assert bound == pytest.approx(spec_gpt_bound(norms, num_blocks, softmax_scale, residual_scale), rel=1e-9)


def test_gpt_bound_without_residual_branches_is_embed_times_head():
    # a = 0: every block is the identity
    norms = _random_gpt_norms(3, seed=6)
    assert Lip.gpt_bound_paper_formula(norms, 3, residual_scale=0.0) == pytest.approx(norms["embed"] * norms["out"], rel=1e-12)
