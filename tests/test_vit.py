"""The Lipschitz ViT (models/vit.py): its forward against plain PyTorch, its certificate in pixel space
and its local certificate (robustness/local.py) against float64 searches that can fail."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ascend_ratio
from lipschitz_lightning.core.bounds import GELU_DIVISOR
from lipschitz_lightning.models import ViT
from lipschitz_lightning.models.gpt import AttentionMask
from lipschitz_lightning.robustness.certified import SLACK, LocalCertificate, PairCertificate
from lipschitz_lightning.robustness.local import vit_reach


def small_vit(seed: int = 0, qk_scale: float = 3.0, **config) -> ViT:
    """A float64 ViT whose attention matters: random weights (no zero init), queries and keys scaled
    up and a large softmax scale, so the score path is a real part of every bound."""
    torch.manual_seed(seed)
    settings = dict(zero_init=False, patch_size=8, width=16, num_heads=2, num_blocks=2, softmax_scale=4.0) | config
    net = ViT(**settings).double().eval()
    with torch.no_grad():
        for block in net.blocks:
            block.attention.q.weight.mul_(qk_scale)
            block.attention.k.weight.mul_(qk_scale)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def plain_vit(net: ViT, images: torch.Tensor) -> torch.Tensor:
    """The ViT's forward written out in plain PyTorch: patches by reshaping, attention with its
    softmax, RoPE on (first half, second half) pairs."""
    cfg, p = net.config, net.config.patch_size
    grid = cfg.image_size // p
    x = images.reshape(-1, grid, p, grid, p, 3).permute(0, 1, 3, 5, 2, 4).reshape(len(images), grid * grid, 3 * p * p)
    x = (x - cfg.input_shift) @ net.patch.weight.T
    n, heads, head_dim = grid * grid, cfg.num_heads, cfg.width // cfg.num_heads
    angles = torch.outer(torch.arange(n, dtype=torch.float64), 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))

    def rope(t):
        first, second = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return torch.cat((first * angles.cos() - second * angles.sin(), first * angles.sin() + second * angles.cos()), dim=-1)

    a = 1 / (2 * cfg.num_blocks)
    for block in net.blocks:
        att = block.attention
        q, k, v = ((x @ w.weight.T).view(len(x), n, heads, head_dim).transpose(1, 2) for w in (att.q, att.k, att.v))
        weights = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) * cfg.softmax_scale / head_dim, dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(len(x), n, cfg.width) / 3 @ att.out.weight.T
        x = (1 - a) * x + a * y
        x = (1 - a) * x + a * (F.gelu(x @ block.mlp.up.weight.T, approximate="tanh") / GELU_DIVISOR @ block.mlp.down.weight.T)
    return (x.mean(dim=1) if cfg.pool == "mean" else x.flatten(1)) @ net.head.weight.T


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_the_forward_is_the_plain_pytorch_computation(pool):
    net = small_vit(pool=pool)
    images = torch.rand(3, 32, 32, 3, dtype=torch.float64)
    torch.testing.assert_close(net(images), plain_vit(net, images), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(net(images.flatten(1)), net(images))  # the flattened pixels, as the MLP takes them
    # every pixel in exactly one patch
    patches = net.patches(torch.arange(3072, dtype=torch.float64).reshape(1, 32, 32, 3) + 0.5)
    assert patches.shape == (1, 16, 192) and sorted(patches.flatten().tolist()) == list(range(3072))


def test_the_local_reach_starts_from_the_network_itself():
    net = small_vit()
    images = torch.rand(4, 32, 32, 3, dtype=torch.float64)
    reach = vit_reach(net, images, 0.1)
    torch.testing.assert_close(reach.logits, net(images), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reach.blocks[-1].center, net.features(images), rtol=1e-12, atol=1e-12)
    assert torch.equal(vit_reach(net, images, 0.0).pooled, torch.zeros(4, dtype=torch.float64))


def pair_ratio(net, y: int, j: int):
    def ratio(a, b):
        difference = lambda x: net(x)[:, y] - net(x)[:, j]  # noqa: E731
        return (difference(a) - difference(b)).abs() / (a - b).flatten(1).norm(dim=1)
    return ratio


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_no_pair_of_images_beats_the_pair_bound_of_its_domain(pool):
    """Images in the pixel box, and images up to ``radius`` outside it (the domain a certified radius
    needs): a float64 search stays under ``K[y, j]`` of that domain."""
    net = small_vit(qk_scale=2.0, pool=pool)
    generator = torch.Generator().manual_seed(0)
    for radius in (0.0, 1.0):
        pairs = net.pairwise_l2_bound(radius)
        # within radius of the box: each pixel at most radius / sqrt(3072) outside it (one such set)
        spill = radius / math.sqrt(3072)
        domain = lambda x: x.clamp(-spill, 1 + spill)  # noqa: E731
        for y, j in [(0, 1), (3, 7)]:
            a = torch.rand(8, 32, 32, 3, generator=generator, dtype=torch.float64)
            b = (a + 0.05 * torch.randn(a.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
            found = ascend_ratio(pair_ratio(net, y, j), a, b, steps=40, lr=2e-2, project=domain)
            assert found <= float(pairs[y, j]) * (1 + SLACK)


def test_a_one_patch_network_reaches_its_pair_bound():
    """The plumbing from pixels to the pair bound (the patch matrix's norm over sqrt(3 p^2), the residual
    mixes, the mean over tokens, the head's rows apart) is exact where nothing else is loose: one patch
    of the whole image and both branches zero leave ``(1 - a)^2 (W_y - W_j) P`` with ``P``'s singular
    values all equal (orthogonal init). A factor wrong in either direction fails here."""
    net = small_vit(patch_size=32, num_blocks=1)
    with torch.no_grad():
        net.blocks[0].attention.out.weight.zero_()
        net.blocks[0].mlp.down.weight.zero_()
    pairs = net.pairwise_l2_bound(0.0)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(4, 32, 32, 3, generator=generator, dtype=torch.float64)
    b = (a + 0.01 * torch.randn(a.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    found = ascend_ratio(pair_ratio(net, 0, 1), a, b, steps=100, lr=1e-2, project=lambda x: x.clamp(0, 1))
    assert found == pytest.approx(float(pairs[0, 1]), rel=1e-3) and found <= float(pairs[0, 1]) * (1 + SLACK)


def test_the_pair_bound_grows_with_the_radius_and_the_global_bound_covers_every_pair():
    net = small_vit()
    small, large = net.pairwise_l2_bound(0.0), net.pairwise_l2_bound(1.0)
    assert torch.all(large >= small) and torch.any(large > small)
    assert torch.all(small <= math.sqrt(2) * float(net.logit_l2_bound(0.0)) * (1 + 1e-12))
    assert net.certified_bound() == pytest.approx(float(net.logit_l2_bound(0.0)) * math.sqrt(3072 / 10), rel=1e-9)


def deviations(net, images: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the local certificate bounds, for the images moved by ``delta``: each block's largest token
    move and whole-sequence move, and the pooled features' move (all l2)."""
    moved = {}
    x, y = net.patch(net.patches(images)), net.patch(net.patches(images + delta))
    rotary, mask = (net.rotary_cos, net.rotary_sin), AttentionMask(causal=False)
    for l, block in enumerate(net.blocks):
        x, y = block(x, rotary, mask, None, str(l)), block(y, rotary, mask, None, str(l))
        moved[f"token{l}"] = (x - y).norm(dim=-1)
        moved[f"total{l}"] = (x - y).flatten(1).norm(dim=1)
    moved["pooled"] = (net.pooled(x) - net.pooled(y)).norm(dim=1)
    return moved


def search_the_ball(net, images: torch.Tensor, radius: float, key: str, steps: int = 60) -> torch.Tensor:
    """Projected gradient ascent (Adam, float64) on ``deviations[key]`` over the l2 ball, from random starts."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    delta = (delta * radius / delta.flatten(1).norm(dim=1)[:, None, None, None]).requires_grad_(True)
    search = torch.optim.Adam([delta], lr=radius / 10)
    best = None
    for _ in range(steps):
        value = deviations(net, images, delta)[key]
        value = value.amax(dim=1) if value.ndim == 2 else value
        best = value.detach() if best is None else torch.maximum(best, value.detach())
        search.zero_grad()
        (-value.sum()).backward()
        search.step()
        with torch.no_grad():
            delta.mul_((radius / delta.flatten(1).norm(dim=1).clamp(min=radius))[:, None, None, None])
    return best


@pytest.mark.parametrize("radius, reached, pool", [(0.05, 1 / 3, "mean"), (0.5, 1 / 8, "mean"), (0.05, 1 / 3, "flatten")])
def test_no_image_of_the_ball_moves_an_activation_past_its_local_bound(radius, reached, pool):
    """Every bound the local certificate carries (each block's per-token and whole-sequence move, the
    pooled features') against a float64 search over the ball; the search reaches ``reached`` of the
    pooled bound (the softmax's swing makes a larger ball's bound looser), so a bound that much too
    small would fail here."""
    net = small_vit(pool=pool)
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reach = vit_reach(net, images, radius)
    last = len(net.blocks) - 1
    bounds = {f"token{last}": reach.blocks[-1].token.amax(dim=1), f"total{last}": reach.blocks[-1].total, "pooled": reach.pooled}
    for key, bound in bounds.items():
        found = search_the_ball(net, images, radius, key)
        assert torch.all(found <= bound * (1 + SLACK)), (key, (found / bound).max())
        if key == "pooled":
            print(f"\nradius {radius}: the search reaches {float((found / bound).min()):.2f}-{float((found / bound).max()):.2f} of the local bound")
            assert torch.all(found > bound * reached)


def test_the_local_certificate_is_never_weaker_than_the_global_one_and_much_tighter_on_small_balls():
    net = small_vit(qk_scale=1.0, softmax_scale=1.0, num_blocks=3)
    images = torch.rand(8, 32, 32, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for radius in (36 / 255, 5.0):
        local = LocalCertificate.of(net, images, batch=3).at(radius)
        assert torch.all(local.drops <= local.global_drops[None])
        torch.testing.assert_close(local.logits, net(images))
    local = LocalCertificate.of(net, images, batch=3).at(36 / 255)
    assert local.tightness()["min"] > 4  # 16 patches: the l2 ball cannot move every one by its whole radius
    labels = local.logits.argmax(dim=1)
    global_certified = PairCertificate.of(net, 10, 36 / 255).certified(local.logits, labels, 36 / 255)
    assert torch.all(local.certified(labels) >= global_certified)


def test_certify_reports_the_local_certificate_and_the_attack_breaks_none_of_it(tmp_path):
    from lipschitz_lightning.robustness.classifier import Attack, LowerBoundSearch, classifier_report

    net = small_vit(qk_scale=1.0, softmax_scale=1.0).float()
    with torch.no_grad():  # a head that separates the classes, so that something is certified
        net.head.weight.mul_(40)
    images = torch.rand(24, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = net(images).argmax(dim=1)
    report = classifier_report(net, images, labels, radii=[0.02, 0.1], attack=Attack(5, 1, 2.5, 12),
                               lower_bound=LowerBoundSearch(4, 2, 5, 1e-3, 0.01), autoattack=None, curve_max_radius=0.2,
                               seed=0, where="test")
    for row in report["radii"]:
        assert row["certified_acc"] <= row["certified_acc_local"] <= row["empirical_acc"]
        assert row["local_tightness"]["median"] >= 1
    assert report["radii"][0]["certified_acc_local"] > 0
    assert report["curve"]["certified_acc"][0] == report["accuracy"] == 1.0


def test_the_certified_experiment_trains_and_certify_reports_its_local_certificate(make_config, tmp_path):
    """``experiment=cifar_vit_certified``, shrunk: trains with the margin loss against the pair bound of
    its radius, logs the validation's certified fraction, and ``certify`` loads the checkpoint as a
    classifier with the local certificate beside the global one."""
    from test_certify import settings

    from lipschitz_lightning.commands import certify as C
    from lipschitz_lightning.commands.train import build, train

    cfg = make_config("experiment=cifar_vit_certified", "model.net.width=16", "model.net.num_blocks=1")
    summary = train(cfg, build(cfg))
    assert 0 <= summary["val/certified_acc"] <= summary["val/acc"]
    (result,) = C.certify(settings(summary["checkpoint"], tmp_path, examples=32)).values()
    assert result["kind"] == "classifier" and result["run"].startswith("muon + spectral_soft_cap, w_max 1")
    for row in result["radii"]:
        assert row["certified_acc"] <= row["certified_acc_local"] <= row["empirical_acc"]
    assert "local drop smaller than the global" in (tmp_path / "certify.md").read_text()


def test_patches_that_do_not_tile_the_image_are_refused_before_anything_is_built(make_config):
    from lipschitz_lightning.config.settings import validate_config
    from lipschitz_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.net\.patch_size must be a divisor of model\.net\.image_size=32, got 5$"):
        validate_config(make_config("model=vit", "model.net.patch_size=5"))


def test_quantize_refuses_a_vit_in_one_line(make_config, tmp_path):
    """No rounding bound is derived for the ViT's attention: quantize says so instead of printing the
    MLP's bound for it."""
    from omegaconf import OmegaConf

    from lipschitz_lightning.commands import quantize as Q
    from lipschitz_lightning.commands.train import build, train
    from lipschitz_lightning.errors import ConfigError

    cfg = make_config("model=vit", "model.net.width=16", "model.net.num_blocks=1", "trainer.max_steps=1")
    checkpoint = train(cfg, build(cfg))["checkpoint"]
    settings = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "quantize.yaml")
    settings.pop("defaults"), settings.pop("hydra")
    settings.ckpt_path, settings.out_dir, settings.paths.data_dir = checkpoint, str(tmp_path / "q"), None
    with pytest.raises(ConfigError, match=r"holds a ViT: quantize certifies the rounding of model=mlp and model=gpt only"):
        Q.quantize(settings)
    assert not (tmp_path / "q").exists()
