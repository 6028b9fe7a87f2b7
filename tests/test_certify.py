"""python -m lipschitz_lightning.certify: the maths against hand computations, and the command on
tiny checkpoints: certified never above attacked, the lower bound never above the certificate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lipschitz_lightning import certify as C
from lipschitz_lightning.training import train

REPO = Path(__file__).resolve().parents[1]


def settings(ckpt_path, out_dir, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "certify.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.ckpt_path, cfg.out_dir = ckpt_path, str(out_dir)
    cfg.paths.data_dir = None
    small = {"attack": {"steps": 10, "restarts": 1, "batch": 512}, "lower_bound": {"points": 32, "pairs": 16, "steps": 20}, "max_batches": 2}
    return OmegaConf.merge(cfg, small, overrides)


def test_margins_radii_and_units_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    torch.testing.assert_close(C.margins(logits, labels), torch.tensor([2.0, -1.0, 0.0]))
    # rms(dy) <= L rms(dx) with 3072 inputs and 10 outputs: ||dy|| <= L sqrt(10/3072) ||dx||
    assert C.l2_bound(2.0, 3072, 10) == pytest.approx(2.0 * math.sqrt(10 / 3072))
    # margin 2 survives any change of l2 size eps when sqrt(2) L eps < 2
    assert C.certified(torch.tensor([2.0]), 1.0, 2 / math.sqrt(2) - 1e-6).item()
    assert not C.certified(torch.tensor([2.0]), 1.0, 2 / math.sqrt(2) + 1e-6).item()


def test_the_pgd_attack_breaks_a_linear_classifier_just_past_its_exact_radius():
    # f(x) = W x with orthonormal rows: the margin of class 0 over 1 falls by sqrt(2) per unit of l2
    net = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x, y = torch.tensor([[0.6, 0.2, 0.5, 0.5]]), torch.tensor([0])
    exact = 0.4 / math.sqrt(2)
    generator = torch.Generator().manual_seed(0)
    assert not C.pgd_l2(net, x, y, exact * 0.95, 50, 1, generator).item()
    assert C.pgd_l2(net, x, y, exact * 1.05, 50, 1, generator).item()


def test_weights_cast_to_low_precision_stay_close():
    net = torch.nn.Linear(64, 64)
    for dtype, tolerance in ((torch.bfloat16, 2**-8), (torch.float8_e4m3fn, 2**-3)):
        cast = C.with_weights_cast(net, dtype)
        error = (cast.weight - net.weight).abs() / net.weight.abs().max()
        assert 0 < float(error.max()) <= tolerance


@pytest.fixture(scope="module")
def tiny_classifier(tiny_cifar, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR, QUIET_TRAINER

    out = tmp_path_factory.mktemp("classifier")
    overrides = [f"paths.data_dir={tiny_cifar}", f"paths.cache_dir={tiny_cifar / 'cache'}", f"paths.output_dir={out}",
                 "model.net.width=32", "data.batch_size=32", "trainer.max_steps=20", "trainer.val_check_interval=20",
                 "constraint.w_max=2", *QUIET_TRAINER]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return train(compose("train", overrides=overrides))["checkpoint"]


def test_certified_accuracy_never_exceeds_the_attacked_one(tiny_classifier, tmp_path):
    results = C.certify(settings(tiny_classifier, tmp_path))
    (result,) = results.values()
    assert result["kind"] == "classifier" and result["examples"] == 128
    accuracy = result["accuracy_by_weight_precision"]["float32"]
    for row in result["radii"]:
        assert row["certified_acc"] <= row["empirical_acc"] <= accuracy
    assert 0 < result["lower_bound"] <= result["bound_rms"]
    assert result["bound_l2"] == pytest.approx(result["bound_rms"] * math.sqrt(10 / 3072))
    assert json.loads((tmp_path / "certify.json").read_text()).keys() == results.keys()
    assert (tmp_path / "certify.png").stat().st_size > 0 and "cert / PGD acc" in (tmp_path / "certify.md").read_text()


def test_a_bound_that_is_too_small_is_caught_loudly(tiny_classifier, tmp_path, monkeypatch):
    from lipschitz_lightning.models import MLP

    monkeypatch.setattr(MLP, "certified_bound", lambda self, norms=None: 1e-3)  # a wrong certificate
    with pytest.raises(C.CertificateBroken, match="certif"):
        C.certify(settings(tiny_classifier, tmp_path))


def test_a_language_model_observes_less_than_it_certifies(tmp_path, shared_data_dir):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR, QUIET_TRAINER

    overrides = ["model=gpt", f"paths.data_dir={shared_data_dir}", f"paths.output_dir={tmp_path / 'run'}", "data.seq_len=32",
                 "data.batch_size=8", "model.net.width=32", "model.net.num_blocks=2", "trainer.max_steps=4",
                 "trainer.val_check_interval=4", *QUIET_TRAINER]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        checkpoint = train(compose("train", overrides=overrides))["checkpoint"]
    (result,) = C.certify(settings(checkpoint, tmp_path / "out")).values()
    assert result["kind"] == "language_model" and len(result["blocks"]) == 2
    for block in result["blocks"]:
        assert block["activation_rms_observed"] <= block["activation_rms_certified"]
        assert block["attention_logit_observed"] <= block["attention_logit_certified"]


def test_the_command_line(tiny_classifier, tmp_path):
    command = [sys.executable, "-m", "lipschitz_lightning.certify", f"ckpt_path={tiny_classifier}", f"out_dir={tmp_path}",
               "attack.steps=5", "lower_bound.points=8", "lower_bound.pairs=8", "lower_bound.steps=5"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cert / PGD acc" in result.stdout and (tmp_path / "certify.json").is_file()
    bad = subprocess.run([*command, "radii=[0.1,-1]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: radii must be")
