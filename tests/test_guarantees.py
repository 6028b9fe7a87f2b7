"""What the project promises users: constrained layers stay in their ball for the whole of
training, and the certified bound really bounds the network."""

from __future__ import annotations

import pytest
import torch

from conftest import NormRecorder, ascend_ratio
from lipschitz_lightning.commands.train import build, train

W_MAX = 1.0  # below where the weights go unconstrained, so every cap binds within a few steps
STEPS = 50


def largest_norm_reached(make_config, shared_data_dir, tmp_path, optimizer: str, constraint: str) -> tuple[float, list]:
    overrides = [f"optimizer={optimizer}", f"constraint={constraint}"]
    if constraint != "none":
        overrides.append(f"constraint.w_max={W_MAX}")
    cfg = make_config(
        f"paths.data_dir={shared_data_dir}",
        "model.net.width=256",
        "data.batch_size=128",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        *overrides,
        output_dir=tmp_path / "run",
    )
    run = build(cfg)
    recorder = NormRecorder()
    run.trainer.callbacks.append(recorder)
    train(cfg, run)
    assert len(recorder.history) == STEPS
    return max(max(step.values()) for step in recorder.history), recorder.history


@pytest.mark.parametrize(
    "optimizer, constraint",
    [
        ("muon", "svd_cap"),
        ("adamw", "svd_cap"),
        ("muon", "spectral_normalize"),
        ("adamw", "spectral_normalize"),
        ("muon", "spectral_soft_cap"),  # exact coupling, the default
    ],
)
@pytest.mark.slow
def test_every_layer_stays_inside_the_ball_after_every_step(make_config, shared_data_dir, tmp_path, optimizer, constraint):
    reached, history = largest_norm_reached(make_config, shared_data_dir, tmp_path, optimizer, constraint)
    print(f"\n{optimizer} + {constraint}: largest RMS->RMS norm over {STEPS} steps = {reached:.5f} (w_max {W_MAX})")
    assert reached <= W_MAX * 1.001
    # the cap must actually bind, or this test would prove nothing
    assert max(history[-1].values()) >= W_MAX * 0.9


@pytest.mark.slow
def test_unconstrained_muon_leaves_the_ball(make_config, shared_data_dir, tmp_path):
    # the control: without a constraint the same run exceeds w_max, so the tests above are not vacuous
    reached, _ = largest_norm_reached(make_config, shared_data_dir, tmp_path, "muon", "none")
    assert reached > W_MAX * 1.5


@pytest.mark.slow
def test_approximate_caps_report_what_they_reach(make_config, shared_data_dir, tmp_path):
    # Neither is a guarantee. The hard cap is a polynomial fit of min(1, s): it lands a little
    # below w_max (measured 0.983 w_max here). The hammer pins only the top singular value, so
    # the next ones climb past w_max under Muon's flat updates (measured 1.55 w_max here).
    hard_cap, _ = largest_norm_reached(make_config, shared_data_dir, tmp_path, "muon", "spectral_hard_cap")
    hammer, history = largest_norm_reached(make_config, shared_data_dir, tmp_path, "muon", "spectral_hammer")
    print(f"\nover {STEPS} Muon steps at w_max {W_MAX}: hard cap reaches {hard_cap:.4f}, hammer {hammer:.4f}")
    assert 0.9 * W_MAX <= hard_cap <= W_MAX * 1.001
    assert hammer > W_MAX * 1.1


# ------------------------------------------------------------------------ the bound is a bound


def rms(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).mean(dim=-1).sqrt()


def lipschitz_ratio(net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||f(x) - f(y)|| / ||x - y||`` in RMS units, the units of the certified bound."""
    return rms(net(x) - net(y)) / rms((x - y).flatten(1))


@pytest.mark.parametrize(
    "optimizer, constraint", [("muon", "spectral_soft_cap"), ("adamw", "none"), ("muon", "spectral_hammer")]
)
def test_no_input_pair_beats_the_certified_bound(make_config, tmp_path, optimizer, constraint):
    cfg = make_config(f"optimizer={optimizer}", f"constraint={constraint}", "trainer.max_steps=30", "trainer.val_check_interval=30")
    run = build(cfg)
    summary = train(cfg, run)
    net = run.module.net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bound = net.certified_bound()
    assert bound == pytest.approx(summary["lipschitz/bound"], rel=1e-6)

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(512, 3, 32, 32, generator=generator)
    far = torch.rand(512, 3, 32, 32, generator=generator)
    near = x + 1e-3 * torch.randn(512, 3, 32, 32, generator=generator)
    sampled = max(lipschitz_ratio(net, x, far).max(), lipschitz_ratio(net, x, near).max())

    # adversarial search: gradient ascent on the ratio from 64 starting pairs
    a = torch.rand(64, 3, 32, 32, generator=generator)
    searched = ascend_ratio(lambda u, v: lipschitz_ratio(net, u, v), a, a + 0.05 * torch.randn(64, 3, 32, 32, generator=generator),
                            steps=200, lr=1e-2)
    print(f"\n{optimizer} + {constraint}: bound {bound:.4g}, sampled {float(sampled):.4g}, searched {float(searched):.4g}")
    assert float(sampled) <= searched * 1.5  # the search finds at least what sampling does
    assert max(float(sampled), float(searched)) <= bound * (1 + 1e-5)
