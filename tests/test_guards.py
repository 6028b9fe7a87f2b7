"""Every guarantee guarded at run time (issue "A bound you can trust", part 2): each guard is
reached here, and what it protects holds when it fires."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lipschitz_lightning.core import constraints as C
from lipschitz_lightning.core.linalg import sigma_upper_bound
from lipschitz_lightning.core.projection import Projection
from lipschitz_lightning.config.settings import TARGET_SECTIONS, target_settings, validate_config
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.optim import Muon, ParamSpec, Role, param_groups
from lipschitz_lightning.core.types import has_range
from lipschitz_lightning.commands.train import build, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def svals(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.double())


def spectrum(shape, values, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator, dtype=torch.float64))
    r = min(shape)
    return (U[:, :r] * torch.as_tensor(values, dtype=torch.float64)) @ V[:, :r].T


# ------------------------------------------------------------------------------ soft cap


def soft_cap_scalar(s, alpha):
    s = s - alpha * s**3
    return s + alpha * s**3


def test_the_soft_cap_guard_fires_past_the_monotone_regime_and_caps_exactly():
    # u / w_max = 0.6: alpha k^2 > 1/3, so a singular value below k would end above w_max (+5.4%)
    w_max, u = 0.5, 0.3
    alpha = C.soft_cap_coupling(w_max, 0.0, u)
    assert not C.soft_cap_is_monotone(alpha, w_max + u)
    grid = np.linspace(0, w_max + u, 100_001)
    assert soft_cap_scalar(grid, alpha).max() > w_max * 1.05  # what the guard prevents
    s_star = 1 / math.sqrt(3 * alpha)  # the scalar map's peak
    W = spectrum((12, 12), [s_star, 0.7, 0.3] + [0.1] * 9, seed=1)
    out, fell_back = C.project_stack(W[None].float(), C.SpectralSoftCap(w_max=w_max), lr_t=u, step_bound=1.0)
    assert fell_back.tolist() == [True]
    assert float(svals(out[0])[0]) <= w_max * (1 + 1e-5)
    unguarded, _ = C.project_stack(W[None].float(), C.SpectralSoftCap(w_max=w_max, guard=False), lr_t=u, step_bound=1.0)
    assert float(svals(unguarded[0])[0]) > w_max * 1.05


def test_the_soft_cap_guard_is_per_matrix_in_a_stack():
    W = torch.stack([spectrum((8, 8), [0.62] + [0.2] * 7, seed=2), spectrum((8, 8), [0.62] + [0.2] * 7, seed=3)]).float()
    # the first matrix steps far (u = 0.3), the second a little (u = 0.01)
    out, fell_back = C.project_stack(W, C.SpectralSoftCap(w_max=0.5), lr_t=(0.3, 0.01), step_bound=1.0)
    assert fell_back.tolist() == [True, False]
    alpha = C.soft_cap_coupling(0.5, 0.0, 0.01)
    torch.testing.assert_close(out[1], C.soft_cap(W[1], alpha))


def test_a_soft_cap_run_with_steps_too_large_for_its_ball_counts_the_fallbacks(make_config):
    # lr * t / w_max = 0.2 * (1/3) / 0.1: far past the monotone regime, every step
    cfg = make_config("constraint.w_max=0.1", "trainer.max_steps=3", "trainer.val_check_interval=3")
    run = build(cfg)
    summary = train(cfg, run)
    assert summary["constraint/guard_fallbacks"] >= 3
    assert max(run.module.net.layer_norms().values()) <= 0.1 * (1 + 1e-4)


def test_adamw_with_the_soft_cap_stays_in_the_ball_where_its_step_goes_past_the_coupling(make_config):
    # AdamW's step has no spectral bound: the soft cap alone would let a large step through (or, far
    # past its range, blow up); the guard checks each matrix's exact norm and caps exactly instead
    cfg = make_config("optimizer=adamw", "optimizer.lr=0.5", "constraint.w_max=1.0", "trainer.max_steps=3",
                      "trainer.val_check_interval=3")
    run = build(cfg)
    summary = train(cfg, run)
    assert summary["constraint/guard_fallbacks"] >= 1
    assert max(run.module.net.layer_norms().values()) <= 1.0 * (1 + 1e-4)


# ------------------------------------------------------------------------------ hard cap


def test_the_hard_cap_polynomial_explodes_past_its_range_and_the_guard_caps_exactly():
    W = spectrum((16, 12), [5.0, 3.0] + [0.5] * 10, seed=4).float()
    exploded = C.hard_cap(W)
    assert not torch.isfinite(exploded).all() or float(svals(exploded)[0]) > 1e100
    out, fell_back = C.project_stack(W[None], C.SpectralHardCap(w_max=1.0))
    assert fell_back.tolist() == [True]
    cap = math.sqrt(16 / 12)  # w_max 1 in RMS units
    torch.testing.assert_close(svals(out[0]), svals(W).clamp(max=cap), rtol=1e-5, atol=1e-5)


def test_sigma_upper_bound_is_an_upper_bound_and_not_too_loose():
    generator = torch.Generator().manual_seed(5)
    for shape in [(30, 10), (10, 30), (64, 64)]:
        W = torch.randn(8, *shape, generator=generator) * torch.logspace(-3, 3, 8)[:, None, None]
        bound = sigma_upper_bound(W)
        exact = svals(W)[..., 0]
        assert (bound.double() >= exact * (1 - 1e-5)).all()
        assert (bound.double() <= exact * min(shape) ** (1 / 8) * (1 + 1e-5)).all()


def test_an_adamw_step_far_outside_the_ball_stays_finite_under_the_hard_cap(make_config):
    # lr 5 with Adam's sign-like step: every layer lands with singular values in the hundreds
    cfg = make_config("optimizer=adamw", "optimizer.lr=5.0", "constraint=spectral_hard_cap", "constraint.w_max=1.0",
                      "trainer.max_steps=3", "trainer.val_check_interval=3")
    run = build(cfg)
    summary = train(cfg, run)
    assert summary["constraint/guard_fallbacks"] >= 1
    assert math.isfinite(summary["val/loss"])
    assert max(run.module.net.layer_norms().values()) <= 1.011  # the polynomial's own range ends at 1.011


# ------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_low_precision_weights_are_refused_with_a_constraint(make_config, precision, tmp_path):
    cfg = make_config(f"trainer.precision={precision}", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer\.precision .*bf16-mixed") as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_low_precision_weights_are_fine_without_a_constraint(make_config):
    validate_config(make_config("trainer.precision=bf16-true", "constraint=none"))


def test_a_constraint_refuses_weights_it_cannot_keep_exact():
    weight = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    optimizer = Muon(param_groups([ParamSpec("w", weight, Role.HIDDEN, 1.0)]))
    with pytest.raises(ConfigError, match="bfloat16"):
        Projection(C.SpectralSoftCap()).attach([optimizer])


# ------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.net.final_scale=nan", "model.net.final_scale"),
        ("optimizer.ns_dtype=float8", "optimizer.ns_dtype"),
        ("trainer.precision=bf17", "trainer.precision"),
        ("optimizer.momentum=1.0", "optimizer.momentum"),
        ("model.net.num_layers=1", "model.net.num_layers"),
    ],
)
def test_mlp_settings_are_checked(make_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(make_config(override))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.net.softmax_scale=0", "model.net.softmax_scale"),
        ("model.net.residual_scale=-1", "model.net.residual_scale"),
        ("model.net.gelu=relu", "model.net.gelu"),
        ("model.net.window_min=0", "model.net.window_min"),
        ("model.stats_tokens=0", "model.stats_tokens"),
    ],
)
def test_gpt_settings_are_checked(make_config, shared_data_dir, override, key):
    cfg = make_config("experiment=shakespeare_gpt_cpu", f"paths.data_dir={shared_data_dir}", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def every_target_in_conf():
    """(yaml file, section, target) for every _target_ a config group option names."""
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        stack = [("", OmegaConf.to_container(OmegaConf.load(path), resolve=False))]
        while stack:
            prefix, item = stack.pop()
            if "_target_" in item:
                yield path.relative_to(REPO), prefix, item["_target_"]
            stack.extend((f"{prefix}.{key}".strip("."), value) for key, value in item.items() if isinstance(value, dict))


def test_every_setting_of_every_target_of_this_package_says_what_it_allows():
    # a new numeric setting without a range in its annotation fails here, so none goes unchecked
    checked_groups = {section.split(".")[0] for section in TARGET_SECTIONS}
    unchecked = []
    for path, section, target in every_target_in_conf():
        settings = target_settings(target)
        if settings is None or path.parts[1] not in checked_groups:
            continue
        unchecked += [f"{path}: {target}.{name}" for name, hint in settings.items()
                      if name not in ("net", "optimizer", "scheduler", "loss") and not has_range(hint)]
    assert not unchecked, unchecked
    assert {"optimizer", "scheduler", "constraint", "loss", "data", "model"} == checked_groups


# ------------------------------------------------------------------------------ model and data


@pytest.mark.parametrize("model, data", [("mlp", "shakespeare"), ("mlp", "fineweb"), ("gpt", "cifar10"), ("nanogpt", "cifar10")])
def test_a_model_on_data_it_cannot_use_is_one_line(model, data, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data={data}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"gives .* trains on .*: use data=") as error:
        validate_config(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model, data", [("mlp", "cifar10"), ("gpt", "shakespeare"), ("nanogpt", "fineweb")])
def test_a_model_alone_brings_its_data(model, data, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="t"):
        cfg = compose("train", overrides=[f"model={model}", f"paths.output_dir={tmp_path}"], return_hydra_config=False)
    assert cfg.data._target_.lower().endswith(f"{data}datamodule".replace("cifar10", "cifar10"))


@pytest.mark.slow
def test_model_gpt_alone_trains_from_the_command_line(shared_data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "model=gpt", "data.seq_len=16", "data.batch_size=4", "data.val_batch_size=512",
         "model.net.width=16", "model.net.num_blocks=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
         f"paths.data_dir={shared_data_dir}", f"paths.log_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val accuracy" in result.stdout


# ------------------------------------------------------------------------------ Muon and non-matrices


def test_muon_sends_a_bias_to_adam_instead_of_crashing():
    generator = torch.Generator().manual_seed(6)
    weight = torch.nn.Parameter(torch.randn(6, 4, generator=generator))
    bias = torch.nn.Parameter(torch.randn(6, generator=generator))
    optimizer = Muon(param_groups([ParamSpec("w", weight, Role.HIDDEN, 1.0), ParamSpec("b", bias, Role.HIDDEN, 1.0)]),
                     lr=0.1, adam_lr=0.01, adam_betas=(0.9, 0.99), adam_eps=1e-8)
    before = bias.detach().clone()
    grads = [torch.randn(6, generator=generator) for _ in range(3)]
    m = v = torch.zeros(6)
    expected = before.clone()
    for t, g in enumerate(grads, start=1):
        weight.grad, bias.grad = torch.randn(6, 4, generator=generator), g.clone()
        optimizer.step()
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        expected = expected - 0.01 * (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
    torch.testing.assert_close(bias.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_the_command_line_names_a_guarded_setting_in_one_line(tiny_cifar, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.precision=bf16-true", f"paths.data_dir={tiny_cifar}", f"paths.log_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: trainer.precision must be")
