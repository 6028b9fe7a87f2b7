"""Muon and AdamW against a plain re-computation of SPEC §3-§5, and the target norms."""

from __future__ import annotations

import math

import pytest
import torch

from lipschitz_lightning.core.linalg import orthogonalize
from lipschitz_lightning.models import MLP
from lipschitz_lightning.optim import AdamW, Muon, ParamSpec, Role, gpt_target_norms, mlp_target_norms, param_groups


def two_weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.nn.Parameter(torch.randn(6, 10, generator=generator))
    table = torch.nn.Parameter(torch.randn(7, 4, generator=generator))
    specs = [ParamSpec("hidden", hidden, Role.HIDDEN, 0.25), ParamSpec("embed", table, Role.EMBEDDING, 0.5)]
    grads = [torch.randn(6, 10, generator=generator) for _ in range(3)], [torch.randn(7, 4, generator=generator) for _ in range(3)]
    return specs, grads


@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_steps_match_the_spec_written_out(nesterov):
    specs, (hidden_grads, table_grads) = two_weights()
    lr, beta, wd, inflation = 0.1, 0.9, 0.3, 16.0
    W, E = specs[0].param.detach().clone(), specs[1].param.detach().clone()
    optimizer = Muon(param_groups(specs), lr=lr, momentum=beta, nesterov=nesterov, weight_decay=wd, embed_inflation=inflation)
    buf_W, buf_E = torch.zeros_like(W), torch.zeros_like(E)
    for g_W, g_E in zip(hidden_grads, table_grads):
        specs[0].param.grad, specs[1].param.grad = g_W.clone(), g_E.clone()
        optimizer.step()
        if nesterov:
            buf_W, buf_E = beta * buf_W + (1 - beta) * g_W, beta * buf_E + (1 - beta) * g_E
            u_W, u_E = (1 - beta) * g_W + beta * buf_W, (1 - beta) * g_E + beta * buf_E
        else:
            buf_W, buf_E = beta * buf_W + (1 - beta) * g_W, beta * buf_E + (1 - beta) * g_E
            u_W, u_E = buf_W, buf_E
        D_W = orthogonalize(u_W) * math.sqrt(6 / 10) * 0.25
        rms_rows = u_E.pow(2).mean(dim=1, keepdim=True).sqrt()
        D_E = u_E / torch.maximum(rms_rows, torch.tensor(1 / inflation)) * 0.5
        W = W * (1 - wd * lr * 0.25) - lr * D_W
        E = E * (1 - wd * lr * 0.5) - lr * D_E
    torch.testing.assert_close(specs[0].param.detach(), W, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(specs[1].param.detach(), E, atol=1e-6, rtol=1e-5)


def test_reference_adamw_has_no_bias_correction_and_decays_by_target_norm():
    specs, (hidden_grads, _) = two_weights()
    spec = specs[0]
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.95), 1e-12, 0.08
    W = spec.param.detach().clone()
    optimizer = AdamW(param_groups([spec]), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, variant="reference")
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    for g in hidden_grads:
        spec.param.grad = g.clone()
        optimizer.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        W = W * (1 - wd * lr * 0.25) - lr * m / (v.sqrt() + eps)
    torch.testing.assert_close(spec.param.detach(), W, atol=1e-6, rtol=1e-5)


def test_torch_adamw_variant_is_torch_adamw_with_target_norm_decay():
    specs, (hidden_grads, _) = two_weights()
    ours = specs[0].param
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = AdamW(param_groups([specs[0]]), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.08, variant="torch")
    assert isinstance(a, torch.optim.AdamW)
    b = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.08 * 0.25)
    for g in hidden_grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())


def test_mlp_target_norms_are_one_over_depth():
    assert mlp_target_norms(3) == [1 / 3] * 3
    net = MLP(input_dim=12, width=8, num_layers=4, num_classes=3)
    specs = net.param_specs()
    assert [s.target_norm for s in specs] == [0.25] * 4
    assert [s.role for s in specs] == [Role.HIDDEN] * 3 + [Role.HEAD]


@pytest.mark.parametrize(
    "mass, embed, qkv, rest", [(16, 0.05556, 0.88889, 0.29630), (5, 0.14286, 0.71429, 0.23810)]
)
def test_gpt_target_norms_match_spec_examples(mass, embed, qkv, rest):
    t = gpt_target_norms(mass)
    assert t["embedding"] == pytest.approx(embed, abs=1e-5) and t["head"] == pytest.approx(embed, abs=1e-5)
    assert t["qkv"] == pytest.approx(qkv, abs=1e-5)
    for role in ("attention_out", "mlp_up", "mlp_down"):
        assert t[role] == pytest.approx(rest, abs=1e-5)


def test_mlp_initialisation_and_zero_init_input_layer():
    net = MLP(input_dim=3072, width=64, num_layers=3, zero_init=True)
    norms = net.layer_norms()
    assert norms["layers.0"] == 0.0
    assert norms["layers.1"] == pytest.approx(1.0, abs=1e-5) and norms["layers.2"] == pytest.approx(1.0, abs=1e-5)
    # with the input layer at zero, gradient must still reach it (ReLU slope 1/2 at 0, as in JAX)
    x = torch.rand(8, 3, 32, 32)
    torch.nn.functional.cross_entropy(net(x), torch.arange(8) % 10).backward()
    assert net.layers[0].weight.grad.abs().sum() > 0
