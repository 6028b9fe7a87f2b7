"""The GPT certificate (docs/certificate.md) against adversarial searches in float64.

Each construction targets one step of the derivation; a search that beats the certificate would
mean the derivation is wrong. Where the paper's formula (SPEC §7) is beaten, the test says so: the
same search that cannot break the certificate does break the formula, so the search has teeth.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ascend_ratio
from lipschitz_lightning.core.bounds import GELU_DIVISOR, GELU_MAX_SLOPE, gpt_certificate
from lipschitz_lightning.models import GPT
from lipschitz_lightning.models.gpt import AttentionMask

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def token_rms_max(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt().amax(-1)


def into_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() / radius).clamp(min=1.0)


def frozen(net: GPT) -> GPT:
    net = net.double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def search_ratio(net: GPT, radius: float, mask: AttentionMask | None = None, seq: int = 8, pairs: int = 64,
                 steps: int = 200, seed: int = 0) -> float:
    """The largest ``||f(x) - f(y)|| / ||x - y||`` found by Adam over pairs in the ball of ``radius``.

    Starts: random directions at full radius (where attention's terms are largest), with partners
    both near (the local Jacobian) and far.
    """
    generator = torch.Generator().manual_seed(seed)
    d = net.config.width
    x = into_ball(torch.randn(pairs, seq, d, generator=generator, dtype=torch.float64) * 10, radius)
    scales = torch.logspace(-3, 0, pairs, dtype=torch.float64)[:, None, None]
    y = into_ball(x + scales * radius * torch.randn(pairs, seq, d, generator=generator, dtype=torch.float64), radius)
    return ascend_ratio(
        lambda a, b: token_rms_max(net.forward_embedded(a, mask=mask) - net.forward_embedded(b, mask=mask)) / token_rms_max(a - b),
        x, y, steps=steps, lr=2e-2 * radius, project=lambda v: into_ball(v, radius),
    )


def head_concentrated(num_heads: int = 4, width: int = 8, softmax_scale: float = 1.0, qk: float = 1.5, **config) -> GPT:
    """The issue's construction: q = k = qk * I on head 0's coordinates only, v = out = I, no MLP."""
    net = GPT(vocab_size=5, width=width, num_heads=num_heads, num_blocks=1, seq_len=8, softmax_scale=softmax_scale,
              zero_init=False, **config)
    head = width // num_heads
    with torch.no_grad():
        attention = net.blocks[0].attention
        Wq = torch.zeros(width, width)
        Wq[:head, :head] = qk * torch.eye(head)
        attention.q.weight.copy_(Wq), attention.k.weight.copy_(Wq)
        attention.v.weight.copy_(torch.eye(width)), attention.out.weight.copy_(torch.eye(width))
        net.blocks[0].mlp.up.weight.zero_(), net.blocks[0].mlp.down.weight.zero_()
        net.head.weight.copy_(torch.eye(width)[:5])
    return frozen(net)


def certificate_and_formula(net: GPT, embed: float = 1.0) -> tuple[float, float]:
    norms = {**net.layer_norms(), "embed": embed}
    return net.certified_bound(norms), net.paper_formula_bound({**norms, "embed": 1.0})


def report(name: str, found: float, certified: float, formula: float) -> None:
    print(f"\n{name}: found {found:.4g}, certificate {certified:.4g}, paper formula {formula:.4g}")


# ------------------------------------------------------------------------------ the constants


def test_gelu_slopes_are_rounded_up_true_maxima():
    z = torch.linspace(-4, 4, 2_000_001, dtype=torch.float64, requires_grad=True)
    for kind, approximate in (("tanh", "tanh"), ("exact", "none")):
        (slope,) = torch.autograd.grad(torch.nn.functional.gelu(z, approximate=approximate).sum(), z)
        true = float(slope.max())
        assert true <= GELU_MAX_SLOPE[kind] <= true + 1e-6, kind
        assert GELU_MAX_SLOPE[kind] > GELU_DIVISOR  # so gelu / 1.1289 is not quite 1-Lipschitz
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    root2 = torch.tensor(math.sqrt(2), dtype=torch.float64)
    closed_form = float(normal.cdf(root2) + root2 * normal.log_prob(root2).exp())
    assert closed_form == pytest.approx(1.128904145, abs=1e-9)


# ------------------------------------------------------------------------------ constructions


def test_the_issue_construction_beats_the_paper_formula_but_not_the_certificate():
    net = head_concentrated()
    certified, formula = certificate_and_formula(net)
    found = search_ratio(net, radius=1.0)
    report("4 heads, q = k = 1.5 on head 0", found, certified, formula)
    assert formula == pytest.approx(0.896, abs=1e-3) and certified == pytest.approx(2.4244, abs=1e-3)
    assert found > formula  # the formula is not a bound
    assert found <= certified


@pytest.mark.parametrize("num_heads, width, qk", [(8, 16, 2.0), (2, 8, 3.0), (1, 8, 2.0)])
@pytest.mark.slow
def test_head_concentrated_scores_never_beat_the_certificate(num_heads, width, qk):
    net = head_concentrated(num_heads=num_heads, width=width, qk=qk)
    certified, formula = certificate_and_formula(net)
    found = search_ratio(net, radius=1.0, seed=num_heads)
    report(f"{num_heads} heads, q = k = {qk} on head 0", found, certified, formula)
    assert found <= certified


def test_a_softmax_scale_below_one_does_not_shrink_the_value_path():
    # near-uniform attention: the value path dominates, and the formula scales it by s
    net = head_concentrated(softmax_scale=0.1, qk=0.5)
    certified, formula = certificate_and_formula(net)
    found = search_ratio(net, radius=1.0, seed=3)
    report("softmax_scale 0.1", found, certified, formula)
    assert found > formula
    assert found <= certified


def random_gpt(seed: int, *, gain: float, num_blocks: int = 2, **config) -> GPT:
    torch.manual_seed(seed)
    net = GPT(**{"vocab_size": 11, "width": 16, "num_heads": 4, "num_blocks": num_blocks, "seq_len": 8,
                 "zero_init": False, **config})
    with torch.no_grad():
        for weight in net.named_matrices().values():
            weight.mul_(gain)
    return frozen(net)


def test_token_rms_above_one_is_covered():
    # unconstrained embeddings can exceed RMS 1: the certificate's ball grows with them, and the
    # ball of radius 1 (the formula's x_0 = 1) is beaten by inputs of RMS 2.5
    net = head_concentrated(qk=1.5)
    certified, formula = certificate_and_formula(net, embed=2.5)
    found = search_ratio(net, radius=2.5, seed=4)
    report("inputs of token RMS 2.5", found, certified, formula)
    assert found > net.certified_bound({**net.layer_norms(), "embed": 1.0})
    assert found <= certified


@pytest.mark.parametrize(
    "config",
    [
        dict(num_blocks=3, softmax_scale=4.0),
        dict(num_blocks=2, layernorm_substitute="tanh", softmax_scale=8.0),
        dict(num_blocks=1, residual_scale=3.0),  # a = 1.5 > 1: the mix keeps |1 - a| of the stream
        dict(num_blocks=2, gelu="exact", rope="half_truncated", rope_base=1024.0, document_token=3,
             window_pattern="LS", window_min=128, window_max=256),
    ],
    ids=["three-blocks", "tanh", "residual-scale-3", "nanogpt-options"],
)
def test_random_networks_never_beat_the_certificate(config):
    net = random_gpt(5, gain=1.8, **config)
    certified, formula = certificate_and_formula(net)
    mask = None
    if config.get("document_token") is not None:  # documents (a window of whole 128-token blocks removes no key of 8)
        mask = AttentionMask(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]]).expand(64, 8), torch.tensor(1))
    found = search_ratio(net, radius=1.0, mask=mask, seed=6)
    report(str(config), found, certified, formula)
    assert found <= certified


def test_trained_weights_never_beat_the_certificate():
    torch.manual_seed(7)
    net = GPT(vocab_size=11, width=16, num_heads=4, num_blocks=2, seq_len=8, softmax_scale=4.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-2)
    tokens = torch.randint(0, 11, (64, 9))
    for _ in range(60):  # memorise random sequences: weights grow well past their initial norms
        loss = torch.nn.functional.cross_entropy(net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net = frozen(net)
    norms = net.layer_norms()
    certified = net.certified_bound(norms)
    found = search_ratio(net, radius=max(1.0, norms["embed"]), seed=8)
    report("trained", found, certified, net.paper_formula_bound(norms))
    assert found <= certified


# ------------------------------------------------------------------------------ the other guarantees


def test_observed_activations_and_logits_stay_under_their_certified_bounds():
    net = random_gpt(9, gain=1.6, num_blocks=3, softmax_scale=2.0)
    certificate = net.certificate({**net.layer_norms(), "embed": 1.0})
    generator = torch.Generator().manual_seed(0)
    x = into_ball(torch.randn(256, 8, 16, generator=generator, dtype=torch.float64) * 5, 1.0)
    stats: dict = {}
    net.forward_embedded(x, stats=stats)
    for l in range(3):
        assert float(stats[f"activation/rms_max_block{l}"]) <= certificate.activation_rms[l]
        assert float(stats[f"attention/max_logit_{l}"]) <= certificate.attention_logit[l]


def test_the_certificate_matches_its_formula_written_out():
    norms = {"embed": 1.7, "out": 0.9, "q0": 1.2, "k0": 0.8, "v0": 1.1, "w0": 0.7, "mlp_in0": 1.3, "mlp_out0": 0.6}
    cert = gpt_certificate(norms, num_blocks=1, num_heads=4, softmax_scale=0.5, residual_scale=1.0, final_scale=-2.0)
    a, r, H, s = 0.5, 1.7, 4, 0.5
    attention = (0.7 / 3) * (2 * 1.1 + 2 * s * H * 1.2 * 0.8 * 1.1 * r**2)
    r_mid = 0.5 * r + a * (0.7 / 3) * 2 * 1.1 * r
    mlp = 0.6 * 1.3 * GELU_MAX_SLOPE["tanh"] / GELU_DIVISOR
    assert cert.bound == pytest.approx((0.5 + a * attention) * (0.5 + a * mlp) * 0.9 * 2.0, rel=1e-12)
    assert cert.input_radius == 1.7
    assert cert.attention_logit[0] == pytest.approx(s * H * 1.2 * 0.8 * r**2, rel=1e-12)
    assert cert.activation_rms[0] == pytest.approx(0.5 * r_mid + a * 0.6 * 1.3 * r_mid / GELU_DIVISOR, rel=1e-12)


def test_normalisation_substitutes_have_no_certificate():
    for substitute in ("rmsnorm", "layernorm"):
        assert math.isinf(random_gpt(0, gain=1.0, layernorm_substitute=substitute).certified_bound())


# ------------------------------------------------------------------------------ the domain of a margin


def position_l2_max(z: torch.Tensor) -> torch.Tensor:
    """The largest l2 norm over a sequence's positions (a certified margin's units)."""
    return z.pow(2).sum(-1).sqrt().amax(-1)


def test_a_radius_around_embedded_inputs_needs_the_certificate_of_the_enlarged_domain():
    # A margin at radius r speaks of inputs within r of an embedded one: they fill D_{R + r}. There
    # the certificate of D_R alone is beaten, the one of D_{R + r} is not (docs/certificate.md §0).
    net = head_concentrated(qk=1.5)
    r = 1.5
    on_embeddings, enlarged = net.certificate(), net.certificate(perturbation=r)
    R = on_embeddings.input_radius  # every token vector at RMS 1 (up to rounding)
    assert R == pytest.approx(1.0) and enlarged.input_radius == R + r
    on_embeddings = on_embeddings.bound
    found = search_ratio(net, radius=R + r, seed=4)
    print(f"\ninputs within 1.5 of the embedding's domain: found {found:.4g}, certificate of D_R {on_embeddings:.4g}, "
          f"of D_(R+r) {enlarged.bound:.4g}")
    assert found > on_embeddings  # what the margin used to rely on is not a bound where it is used
    assert found <= enlarged.bound
    assert float(net.logit_l2_bound(r)) == pytest.approx(enlarged.bound * math.sqrt(net.config.vocab_size), rel=1e-12)


@pytest.mark.parametrize("radius", [0.25, 1.5])
def test_no_perturbation_within_the_radius_moves_a_position_s_logits_past_the_margin_s_bound(radius):
    # the margin loss's claim itself: from an input of the embedding's domain, a perturbation of
    # token RMS at most r moves one position's logits by at most L_l2 * r in l2
    net = head_concentrated(qk=1.5)
    R = net.certificate().input_radius
    generator = torch.Generator().manual_seed(5)
    x = into_ball(torch.randn(64, 8, 8, generator=generator, dtype=torch.float64) * 10, R)
    p = into_ball(torch.randn(64, 8, 8, generator=generator, dtype=torch.float64) * 10, radius)
    found = ascend_ratio(
        lambda a, b: position_l2_max(net.forward_embedded(a + b) - net.forward_embedded(a)) / radius,
        x, p, steps=200, lr=2e-2 * radius, project=lambda v: into_ball(v, R), project_b=lambda v: into_ball(v, radius),
    )
    bound = float(net.logit_l2_bound(radius))
    print(f"\nradius {radius}: largest logit move per unit radius {found:.4g}, bound {bound:.4g}")
    assert found <= bound


@pytest.mark.parametrize("radius", [0.02, 0.1])
def test_no_perturbation_within_the_radius_moves_a_position_past_its_local_bound(radius):
    """The local certificate of the causal GPT (robustness/local.py, docs/certificate.md §9): around
    given tokens, a float64 search over perturbations of token RMS at most ``radius`` never moves a
    position's last features by more than its local bound, and reaches a fifth of it."""
    from lipschitz_lightning.robustness.local import gpt_reach

    net = random_gpt(3, gain=1.0, softmax_scale=4.0)
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(6))
    logits, bound = gpt_reach(net, tokens, radius)
    torch.testing.assert_close(logits, net(tokens), rtol=1e-12, atol=1e-12)
    x = net.embed(tokens)
    generator = torch.Generator().manual_seed(7)
    p = into_ball(torch.randn(x.shape, generator=generator, dtype=torch.float64), radius).requires_grad_(True)
    search = torch.optim.Adam([p], lr=radius / 10)
    found = torch.zeros_like(bound)
    for _ in range(150):
        move = (net.features_embedded(x + p) - net.features_embedded(x)).norm(dim=-1)
        found = torch.maximum(found, move.detach())
        search.zero_grad()
        (-move.sum()).backward()
        search.step()
        with torch.no_grad():
            p.copy_(into_ball(p, radius))
    print(f"\nradius {radius}: the search reaches {float((found / bound).max()):.2f} of the local bound")
    assert torch.all(found <= bound * (1 + 1e-6)) and float((found / bound).max()) > 0.2
