"""The certificate per pair of classes (docs/certified_training.md) against float64 searches (never
beaten, reached on a construction), never looser than the global one; MaxMin's Lipschitz constant and
its gradient norm; the per-pair margin loss written out in plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ascend_ratio
from lipschitz_lightning.core.losses import CertifiedMargin
from lipschitz_lightning.models import MLP
from lipschitz_lightning.models.mlp import MaxMin, maxmin
from lipschitz_lightning.models.protocol import PlainNetwork
from lipschitz_lightning.robustness.certified import SLACK, PairCertificate, l2_bound
from lipschitz_lightning.step import training_margin

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def frozen64(net: nn.Module) -> nn.Module:
    net = net.double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def random_mlp(seed: int, activation: str = "relu", layers: int = 3) -> MLP:
    torch.manual_seed(seed)
    net = MLP(input_dim=24, width=16, num_layers=layers, num_classes=5, zero_init=False, final_scale=1.7, activation=activation)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.mul_(1.5)
        # a head of unequal singular values: with a flat spectrum (the orthogonal initialisation, or
        # Muon's) its rows are orthogonal and of one length, and every pair gets the global bound
        net.layers[-1].weight.copy_(torch.randn(5, 16) / 4)
    return frozen64(net)


def pair_ratio(net, y: int, j: int):
    """``|Δ(f_y - f_j)| / ||Δx||_2`` of a pair of inputs, what ``K[y, j]`` bounds."""
    def ratio(a, b):
        difference = lambda x: net(x)[:, y] - net(x)[:, j]  # noqa: E731
        return (difference(a) - difference(b)).abs() / (a - b).norm(dim=1)
    return ratio


@pytest.mark.parametrize("activation", ["relu", "maxmin"])
def test_no_pair_of_inputs_moves_a_logit_difference_past_its_pair_bound(activation):
    net = random_mlp(0, activation)
    pairs = net.pairwise_l2_bound()
    global_bound = math.sqrt(2) * float(net.logit_l2_bound())
    assert pairs.shape == (5, 5) and torch.all(pairs.diagonal() == 0)
    assert torch.all(pairs <= global_bound * (1 + 1e-12))  # never looser than the global certificate
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for y, j in [(0, 1), (2, 4), (3, 0)]:
        a = torch.rand(32, 24, generator=generator, dtype=torch.float64)
        b = a + 1e-2 * torch.randn(32, 24, generator=generator, dtype=torch.float64)
        found = ascend_ratio(pair_ratio(net, y, j), a, b, steps=200, lr=1e-2)
        worst = max(worst, found / float(pairs[y, j]))
        assert found <= float(pairs[y, j]) * (1 + SLACK)
    print(f"\n{activation}: the search reaches {worst:.3f} of the pair bound at most (global/pair: "
          f"{global_bound / float(pairs[pairs > 0].min()):.2f}x)")
    assert worst > 0.2


def test_a_construction_reaches_the_pair_bound_exactly_where_the_global_one_is_loose():
    # one hidden layer s*I on positive inputs (the ReLU passes everything): f_y - f_j = c s (W_y - W_j) x,
    # whose steepest direction is W_y - W_j; the global bound sqrt(2) sigma_max is loose for any pair
    torch.manual_seed(2)
    net = MLP(input_dim=8, width=8, num_layers=2, num_classes=4, zero_init=False, final_scale=0.5)
    with torch.no_grad():
        net.layers[0].weight.copy_(3.0 * torch.eye(8))
        net.layers[1].weight.copy_(torch.randn(4, 8))
    net = frozen64(net)
    pairs = net.pairwise_l2_bound()
    W = net.layers[1].weight
    x = torch.full((1, 8), 2.0, dtype=torch.float64)
    for y, j in [(0, 1), (1, 3)]:
        direction = (W[y] - W[j]) / (W[y] - W[j]).norm()
        reached = float(pair_ratio(net, y, j)(x, x + 1e-3 * direction))
        assert reached == pytest.approx(float(pairs[y, j]), rel=1e-9)
        assert float(pairs[y, j]) < math.sqrt(2) * float(net.logit_l2_bound())


def test_the_pair_certificate_certifies_what_the_global_one_does_and_more_and_both_hold_their_radius():
    net = random_mlp(3)
    x = torch.rand(400, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logits = net(x)
    y = logits.argmax(1)
    y[:50] = (y[:50] + 1) % 5  # some misclassified points
    pair = PairCertificate.of(net, 5, 0.0)
    every = PairCertificate.global_bound(l2_bound(net.certified_bound(), 24, 5), 5)
    assert pair.kind == "per pair of classes" and every.kind == "global"
    radius = float(pair.radii(logits, y).median())
    assert torch.all(every.certified(logits, y, radius) <= pair.certified(logits, y, radius))
    assert pair.certified(logits, y, radius).sum() > every.certified(logits, y, radius).sum()
    assert not pair.certified(logits[:50], y[:50], 0.0).any()  # misclassified: never certified
    # a certified point moved to the edge of its radius, down the gradient of its worst pair's
    # difference (the steepest way to another class), keeps its class
    radii = pair.radii(logits, y)
    for i in torch.nonzero(radii > 0)[:20, 0].tolist():
        differences = pair.differences(logits[i:i + 1], y[i:i + 1])[0]
        j = int((differences / pair.pairs[y[i]]).argmin())
        point = x[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(point)[0, y[i]] - net(point)[0, j], point)
        moved = x[i] - 0.999 * float(radii[i]) * grad[0] / grad.norm()
        assert int(net(moved[None]).argmax()) == int(y[i])
        assert pair.violation(net, x[i], moved - x[i], y[i]) is None


def test_maxmin_is_1_lipschitz_keeps_the_gradient_norm_and_a_search_reaches_1():
    generator = torch.Generator().manual_seed(5)
    a, b = (torch.randn(64, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    ratio = lambda u, v: (maxmin(u) - maxmin(v)).norm(dim=1) / (u - v).norm(dim=1)  # noqa: E731
    assert float(ratio(a, b).max()) <= 1 + 1e-12
    found = ascend_ratio(ratio, a, b, steps=100, lr=1e-2)
    assert 0.999 <= found <= 1 + 1e-12
    # the Jacobian is a permutation: every gradient keeps its norm (ReLU's drops the negative half)
    x = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(16, dtype=torch.float64)
    (grad,) = torch.autograd.grad(maxmin(x), x, g)
    assert float(grad.norm()) == pytest.approx(float(g.norm()))
    assert torch.equal(MaxMin()(a), maxmin(a)) and MaxMin.lipschitz_constant == 1.0
    plain = PlainNetwork(nn.Sequential(nn.Linear(16, 16), MaxMin(), nn.Linear(16, 3)))
    assert plain.certified_bound() == pytest.approx(math.prod(plain.layer_norms().values()))


def test_a_plain_sequential_gets_the_same_pair_bound_as_our_mlp_with_its_weights():
    net = random_mlp(7, "maxmin")
    plain = nn.Sequential(nn.Linear(24, 16, bias=False), MaxMin(), nn.Linear(16, 16, bias=False), MaxMin(),
                          nn.Linear(16, 5)).double()  # a bias on the head shifts the logits, stretches no difference
    with torch.no_grad():
        for mine, ours in zip(plain[::2], net.layers):
            mine.weight.copy_(ours.weight * (net.final_scale if ours is net.layers[-1] else 1.0))
    plain = frozen64(plain)
    x = torch.rand(8, 24, dtype=torch.float64)
    assert torch.allclose(plain(x) - plain[-1].bias, net(x))
    assert torch.allclose(PlainNetwork(plain).pairwise_l2_bound(), net.pairwise_l2_bound(), rtol=1e-12)
    # an activation after the head: every pair gets the global bound, sqrt(2) times the l2 one
    capped = PlainNetwork(nn.Sequential(*plain, nn.Tanh()))
    assert torch.allclose(capped.pairwise_l2_bound().max(), math.sqrt(2) * capped.logit_l2_bound())


def test_the_per_pair_margin_loss_is_the_formula_in_plain_pytorch_and_counts_certified_points():
    net = random_mlp(6).float()
    loss_fn = CertifiedMargin(radius=0.05, temperature=4.0)
    assert loss_fn.pairwise
    x, y = torch.rand(128, 24), torch.randint(0, 5, (128,))
    margin = training_margin(net, loss_fn)
    assert margin.shape == (5, 5)
    torch.testing.assert_close(margin, net.pairwise_l2_bound() * 0.05)
    logits = net(x).requires_grad_(True)
    loss, correct, counted = loss_fn(logits, y, margin)
    expected = F.cross_entropy(4.0 * (logits + margin[y].float()), y)
    torch.testing.assert_close(loss, expected)
    assert counted == PairCertificate(net.pairwise_l2_bound(), "per pair of classes").certified(logits.detach(), y, 0.05).sum()
    # the global margin where the loss asks for it
    assert training_margin(net, CertifiedMargin(radius=0.05, pairwise=False)).ndim == 0


def test_the_module_reports_validation_certified_per_pair(make_config):
    from lipschitz_lightning.commands.train import build, train

    cfg = make_config("loss=certified_margin", "loss.radius=0.02", "trainer.max_steps=4", "trainer.val_check_interval=4",
                      "model.net.activation=maxmin")
    run = build(cfg)
    summary = train(cfg, run)
    net = run.module.net
    assert 0 <= summary["val/certified_acc"] <= summary["val/acc"]
    assert PairCertificate.of(net, 10, 0.0).kind == "per pair of classes"


def test_under_mixed_precision_the_training_count_is_labelled_an_estimate(make_config):
    # margins of bf16 logits certify nothing: the metric says so in its name
    import csv
    from pathlib import Path

    from lipschitz_lightning.commands.train import build, train

    cfg = make_config("loss=certified_margin", "loss.radius=0.02", "trainer.max_steps=2", "trainer.val_check_interval=2",
                      "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=1")
    train(cfg, build(cfg))
    header = next(csv.reader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")))
    assert "train/certified_estimate" in header and "train/certified" not in header
