"""python -m lipschitz_lightning.certify: the maths against hand computations, then the command on
tiny checkpoints: certified never above attacked, point by point; the lower bound never above the
certificate; a wrong bound caught loudly; a language model's observations under its certificate;
the files; bad inputs; the command line end to end."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lipschitz_lightning.commands import certify as C
from lipschitz_lightning.commands.runs import load_run
from lipschitz_lightning.data.common import evaluation_examples
from lipschitz_lightning.errors import CertificateBroken
from lipschitz_lightning.robustness import attacks, observe, precision
from lipschitz_lightning.robustness import certified as cert
from lipschitz_lightning.core.bounds import rms_norm
from lipschitz_lightning.models import GPT, MLP
from lipschitz_lightning.commands.train import train
from test_gpt import tiny_checkpoints  # noqa: F401  (a constrained and an unconstrained tiny GPT)

REPO = Path(__file__).resolve().parents[1]

# tiny tensors: one thread, or every op pays milliseconds of OpenMP hand-off on a busy machine
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def settings(ckpt_path, out_dir, **overrides):
    """conf/certify.yaml as the command composes it, with a small budget."""
    cfg = OmegaConf.load(REPO / "conf" / "certify.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.ckpt_path, cfg.out_dir = ckpt_path, (str(out_dir) if out_dir is not None else None)
    cfg.paths.data_dir = None  # the run's own data
    small = {"attack": {"steps": 10, "restarts": 2, "batch": 512}, "autoattack": {"examples": 0},
             "lower_bound": {"points": 32, "pairs": 8, "steps": 20}, "max_batches": 2,
             # radii at which the tiny classifier has certified points, and points the attack breaks
             "radii": [2.0, 4.0, 8.0]}
    return OmegaConf.merge(cfg, small, overrides)


# ----------------------------------------------------------------------------- the maths by hand


def test_margins_units_and_certified_radius_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    torch.testing.assert_close(cert.margins(logits, labels), torch.tensor([2.0, -1.0, 0.0]))
    # rms(dy) <= L rms(dx), 3072 inputs, 10 outputs: ||dy|| <= L sqrt(10 / 3072) ||dx||
    assert cert.l2_bound(4.0, 3072, 10) == pytest.approx(4.0 * 0.0570544, rel=1e-5)
    # L_rms = 4: L_l2 = 0.2282177; a margin of 0.5 survives every l2 change below
    # 0.5 / (sqrt(2) * 0.2282177) = 1.549193, i.e. 395.04/255
    bound_l2 = cert.l2_bound(4.0, 3072, 10)
    radius = cert.certified_radius(torch.tensor([0.5, -0.3]), bound_l2)
    torch.testing.assert_close(radius, torch.tensor([1.549193, 0.0]), rtol=1e-5, atol=0)
    assert cert.certified(torch.tensor([0.5]), bound_l2, 1.5491).item()
    assert not cert.certified(torch.tensor([0.5]), bound_l2, 1.5493).item()
    assert not cert.certified(torch.tensor([-0.5]), bound_l2, 1e-9).item()  # misclassified: never certified


def test_the_l2_bound_of_a_linear_map_is_its_spectral_norm():
    # for f(x) = W x the best l2 constant is sigma_max(W); the RMS->RMS norm converts to it exactly
    W = torch.randn(10, 3072, dtype=torch.float64)
    assert cert.l2_bound(rms_norm(W), 3072, 10) == pytest.approx(float(torch.linalg.matrix_norm(W, ord=2)), rel=1e-9)


def test_the_pgd_attack_breaks_a_linear_classifier_just_past_its_exact_radius():
    # f(x) = W x with orthonormal rows: the margin of class 0 over 1 falls by sqrt(2) per unit of l2
    net = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x, y = torch.tensor([[0.6, 0.2, 0.5, 0.5]]), torch.tensor([0])
    exact = 0.4 / math.sqrt(2)
    broken, _ = attacks.pgd_l2(net, x, y, exact * 0.95, steps=50, restarts=1)
    assert not broken.item()
    broken, delta = attacks.pgd_l2(net, x, y, exact * 1.05, steps=50, restarts=1)
    assert broken.item() and float(delta.norm()) <= exact * 1.05 * (1 + 1e-6)


def test_the_attack_stays_in_the_ball_and_the_box():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    x, y = torch.rand(64, 20), torch.randint(0, 5, (64,))
    broken, delta = attacks.pgd_l2(net, x, y, 0.3, steps=20, restarts=3, generator=torch.Generator().manual_seed(0))
    assert broken.any()
    assert float(delta.norm(dim=1).max()) <= 0.3 * (1 + 1e-5)
    assert float((x + delta).min()) >= 0 and float((x + delta).max()) <= 1
    with torch.no_grad():  # every reported perturbation does flip its point
        assert (cert.margins(net(x + delta), y)[broken] <= 0).all()


def test_lower_bounds_of_a_linear_map_reach_its_norm_and_a_violation_is_recognised():
    W = torch.randn(10, 48, dtype=torch.float64) / 7
    net = torch.nn.Linear(48, 10, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(W)
    exact = rms_norm(W)
    x = torch.rand(6, 48, dtype=torch.float64)
    norms, directions = attacks.jacobian_norms(net, x)
    torch.testing.assert_close(norms, torch.full((6,), exact, dtype=torch.float64))
    found, _ = attacks.pair_search(copy.deepcopy(net).float(), net, x[:3], directions[:3], steps=5, lr=1e-3, gap=1e-3)
    assert found == pytest.approx(exact, rel=1e-6) and found <= exact * (1 + cert.SLACK)
    # the margin of a legitimate pair falls by no more than sqrt(2) L_l2 ||delta||; with half the bound it does
    label, delta = torch.tensor(0), directions[0] * 0.01
    bound_l2 = cert.l2_bound(exact, 48, 10)
    assert attacks.lipschitz_violation(net, x[0], delta, label, bound_l2) is None
    drop = float(cert.margins(net(x[:1]), label.view(1)) - cert.margins(net(x[:1] + delta), label.view(1)))
    if drop > 0:  # the steepest direction need not lower this particular margin
        assert attacks.lipschitz_violation(net, x[0], delta, label, drop / (math.sqrt(2) * 0.01) / 2) is not None


def test_weights_cast_to_low_precision_stay_close_and_fp8_is_amax_scaled():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        net.weight.mul_(0.01)  # RMS-scale entries: unscaled e4m3 would lose them to subnormals
    for dtype, tolerance in ((torch.bfloat16, 2**-8), (torch.float8_e4m3fn, 2**-4)):
        cast = precision.with_weights_cast(net, dtype)
        error = (cast.weight - net.weight).abs() / net.weight.abs().clamp(min=net.weight.abs().max() / 64)
        assert 0 < float(error.max()) <= tolerance, dtype
    fp8 = precision.cast_tensor(net.weight.detach(), torch.float8_e4m3fn)
    assert float(fp8.abs().max()) == pytest.approx(float(net.weight.abs().max()), rel=1e-6)  # amax lands on 448 exactly
    unscaled = net.weight.detach().to(torch.float8_e4m3fn).float()
    assert float((fp8 - net.weight).abs().mean()) < float((unscaled - net.weight).abs().mean()) / 4


# ----------------------------------------------------------------------------- classifier checkpoints


@pytest.fixture(scope="module")
def tiny_classifier(single_torch_thread, tiny_cifar, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR, QUIET_TRAINER

    out = tmp_path_factory.mktemp("classifier") / "run"
    overrides = [f"paths.data_dir={tiny_cifar}", f"paths.cache_dir={tiny_cifar / 'cache'}", f"paths.output_dir={out}",
                 "model.net.width=32", "data.batch_size=32", "trainer.max_steps=12", "trainer.val_check_interval=12",
                 "constraint.w_max=2", *QUIET_TRAINER]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return train(compose("train", overrides=overrides))["checkpoint"]


def test_autoattack_beside_pgd_breaks_no_certified_point(tiny_classifier, tmp_path):
    cfg = settings(tiny_classifier, tmp_path, autoattack={"examples": 64})
    (result,) = C.certify(cfg).values()
    a = result["autoattack"]
    assert a["examples"] == 64 and a["radius"] == min(cfg.radii)
    # nothing certified falls; the attacks are compared point by point on the same 64 points
    assert a["certified_acc"] <= a["autoattack_acc"] and a["certified_acc"] <= a["pgd_acc"]
    assert a["autoattack_acc"] - a["pgd_acc"] == pytest.approx((a["broken_by_pgd_only"] - a["broken_by_autoattack_only"]) / 64)
    assert a["autoattack_acc"] < accuracy_on_first(result, 64) or a["pgd_acc"] < accuracy_on_first(result, 64)  # teeth
    assert "| AutoAttack |" in (tmp_path / "certify.md").read_text()


def accuracy_on_first(result: dict, count: int) -> float:
    loaded = load_run(settings(result["checkpoint"], None), result["checkpoint"])
    x, y = evaluation_examples(loaded.datamodule, count)
    with torch.no_grad():
        return float((loaded.saved.net(x).argmax(1) == y).float().mean())


def test_autoattack_without_torchattacks_is_one_line_before_any_work(tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "available", lambda module: module != "torchattacks")
    from lipschitz_lightning.commands.extras import install_line

    expected = f"autoattack.examples=64: AutoAttack needs torchattacks: {install_line('torchattacks')} "
    assert "pip install --no-deps torchattacks" in expected
    with pytest.raises(C.ConfigError, match="^" + re.escape(expected)):
        C.certify(settings(tiny_classifier, tmp_path, autoattack={"examples": 64}))
    assert not (tmp_path / "certify.json").exists()


def test_certified_never_exceeds_attacked_point_by_point(tiny_classifier, tmp_path):
    cfg = settings(tiny_classifier, tmp_path)
    results = C.certify(cfg)
    (result,) = results.values()
    assert result["kind"] == "classifier" and result["examples"] == 128 and result["run"] == "muon + spectral_soft_cap, w_max 2"
    assert result["bound_l2"] == pytest.approx(result["bound_rms"] * math.sqrt(10 / 3072))
    for row in result["radii"]:
        assert row["certified_acc"] <= row["empirical_acc"] <= result["accuracy"]
    # the checks below have teeth: points certified, and points the attack breaks
    assert result["radii"][0]["certified_acc"] > 0 and result["radii"][-1]["empirical_acc"] < result["accuracy"]

    # again, point by point, from the plain functions
    loaded = load_run(cfg, tiny_classifier)
    net = precision.frozen(loaded.saved.net)
    x, y = evaluation_examples(loaded.datamodule, None)
    with torch.no_grad():
        logits = net(x)
    margin = cert.margins(logits, y)
    bound_l2 = cert.l2_bound(net.certified_bound(), 3072, 10)
    assert result["certificate"] == "per pair of classes"
    pairs = cert.PairCertificate.of(net, 10, 0.0)
    for eps in cfg.radii:
        broken, delta = attacks.pgd_l2(net, x, y, eps, steps=20, restarts=2, generator=torch.Generator().manual_seed(1))
        row = next(r for r in result["radii"] if r["radius"] == eps)
        every = cert.certified(margin, bound_l2, eps)  # the global certificate, sqrt(2) L_l2 for every pair
        safe = pairs.certified(logits, y, eps)
        assert not (safe & broken).any(), eps
        assert torch.all(every <= safe)  # never looser
        assert float(safe.float().mean()) == pytest.approx(row["certified_acc"])
        assert float(every.float().mean()) == pytest.approx(row["certified_acc_global"])

    # the lower bound: above 0, below the certificate, and it is what the Jacobians give at least
    assert 0 < result["lower_bound_jacobian"] <= result["lower_bound"] <= result["bound_rms"]
    assert result["bound_over_lower_bound"] >= 1
    assert set(result["weights"]) == {"float32", "bfloat16", "float8_e4m3"}
    assert result["weights"]["float32"]["accuracy"] == result["accuracy"]


def test_the_files_and_the_default_output_folder(tiny_classifier):
    run = Path(tiny_classifier).parent.parent
    best = next(p for p in (run / "checkpoints").glob("best-step*.ckpt"))
    results = C.certify(settings([tiny_classifier, str(best)], None, examples=32))
    assert list(results) == [f"{run.name}/last.ckpt", f"{run.name}/{best.name}"]  # two of one run: told apart
    data = json.loads((run / "certify.json").read_text())
    assert data.keys() == results.keys() and len(data[f"{run.name}/last.ckpt"]["curve"]["radius"]) == 201
    table = (run / "certify.md").read_text()
    assert table.count("\n") == 4 and "certified / PGD acc at 510/255" in table
    assert (run / "certify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bound_that_is_too_small_is_caught_by_the_attack(tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(MLP, "certified_bound", lambda self, norms=None: 1e-3)  # a wrong certificate
    wrong = 1e-4 * (1 - torch.eye(10, dtype=torch.float64))  # and per pair of classes, what certify checks with
    monkeypatch.setattr(MLP, "pairwise_l2_bound", lambda self, radius=0.0: wrong)
    with pytest.raises(CertificateBroken) as error:
        C.certify(settings(tiny_classifier, tmp_path))
    message = str(error.value)
    assert message.startswith(f"certificate broken: {tiny_classifier}: PGD flipped validation point ")
    assert "within l2 radius 2 (510/255)" in message and "\n" not in message
    assert not (tmp_path / "certify.json").exists()


def test_a_bound_that_is_too_small_is_caught_by_the_lower_bound(tiny_classifier, tmp_path, monkeypatch):
    true_bound = MLP.certified_bound
    monkeypatch.setattr(MLP, "certified_bound", lambda self, norms=None: true_bound(self) / 1e3)
    # radii too small for any attack to flip a point: only the Lipschitz searches can notice
    with pytest.raises(CertificateBroken, match=r"^certificate broken: .*: the Jacobian at validation point \d+ has RMS->RMS norm .* above the certified bound"):
        C.certify(settings(tiny_classifier, tmp_path, radii=[1e-9]))


@pytest.mark.slow
def test_the_command_line_end_to_end(tiny_classifier, tmp_path):
    """One subprocess: the table on stdout, the files next to the checkpoint's run, nothing in the cwd."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = Path(tiny_classifier).parent.parent
    env = {k: v for k, v in os.environ.items() if k != "LIPSCHITZ_DATA_DIR"}  # the run's own (tiny) data
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "lipschitz_lightning.certify", f"ckpt_path={tiny_classifier}", "examples=64",
               "attack.steps=5", "lower_bound.points=8", "lower_bound.pairs=4", "lower_bound.steps=5"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| checkpoint | run | bound (RMS) |" in result.stdout and f"written: {run / 'certify.json'}" in result.stdout
    assert json.loads((run / "certify.json").read_text())[run.name]["examples"] == 64
    assert list(cwd.iterdir()) == []  # no run directory, no outputs/, no .hydra


# ----------------------------------------------------------------------------- the command's errors


def run_command(monkeypatch, capsys, *overrides) -> tuple[int, str]:
    """``python -m lipschitz_lightning.certify <overrides>`` in this process: the settings composed and
    checked as on the command line, then the command: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        C.main(list(overrides))
    return exit_.value.code, capsys.readouterr().err


def test_a_broken_certificate_exits_2_with_one_line(tiny_classifier, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MLP, "certified_bound", lambda self, norms=None: 1e-3)
    monkeypatch.setattr(MLP, "pairwise_l2_bound", lambda self, radius=0.0: 1e-4 * (1 - torch.eye(10, dtype=torch.float64)))
    monkeypatch.delenv("LIPSCHITZ_DATA_DIR", raising=False)
    status, err = run_command(monkeypatch, capsys, f"ckpt_path={tiny_classifier}", f"out_dir={tmp_path}", "radii=[2.0,4.0,8.0]", "attack.steps=5",
                           "lower_bound.points=8", "lower_bound.pairs=4", "lower_bound.steps=5")
    assert status == C.EXIT_CERTIFICATE_BROKEN == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: certificate broken: {tiny_classifier}: PGD flipped validation point ")


def test_bad_inputs_are_one_line_errors(tiny_classifier, tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        ([], "error: ckpt_path must be given"),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "error: ckpt_path must be an existing checkpoint file"),
        ([f"ckpt_path={garbage}"], f"error: ckpt_path '{garbage}' is not a readable checkpoint"),
        ([f"ckpt_path={tiny_classifier}", "radii=[0.1,0]"], "error: radii.1 must be a number > 0, got 0"),
        ([f"ckpt_path={tiny_classifier}", "radii=-0.1"], "error: radii must be a non-empty list, each a number > 0"),
        ([f"ckpt_path={tiny_classifier}", "attack.stepz=3"], "error: attack.stepz is not a setting of "),
        ([f"ckpt_path={tiny_classifier}", "attack.steps=0"], "error: attack.steps must be an integer >= 1, got 0"),
        ([f"ckpt_path={tiny_classifier}", "lower_bound.lr=0"], "error: lower_bound.lr must be a number > 0, got 0"),
        ([f"ckpt_path={tiny_classifier}", "examples=0"], "error: examples must be an integer >= 1"),
        ([f"ckpt_path={tiny_classifier}", "+data.bogus=1"], "error: data.bogus is not a setting of the run's data"),
    ]
    for overrides, expected in cases:
        status, err = run_command(monkeypatch, capsys, *overrides, f"out_dir={tmp_path / 'out'}")
        assert status == C.EXIT_BAD_INPUT == 1, overrides
        assert len(err.strip().splitlines()) == 1, (overrides, err)
        assert err.startswith(expected), (overrides, err)
    assert not (tmp_path / "out").exists()


def test_bad_data_folder_is_a_one_line_error(tiny_classifier, tmp_path):
    with pytest.raises(Exception) as error:
        C.certify(settings(tiny_classifier, tmp_path, paths={"data_dir": str(tmp_path / "nowhere")}))
    assert isinstance(error.value, C.LipschitzLightningError) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- language models


def test_a_language_model_observes_less_than_it_certifies(tiny_checkpoints, tmp_path):  # noqa: F811
    results = C.certify(settings([tiny_checkpoints["constrained"], tiny_checkpoints["unconstrained"]], tmp_path))
    assert len(results) == 2
    for result in results.values():
        assert result["kind"] == "language_model" and len(result["blocks"]) == 2 and result["batches_observed"] == 2
        for block in result["blocks"]:
            assert 0 < block["activation_rms_observed"] <= block["activation_rms_certified"]
            assert 0 < block["attention_logit_observed"] <= block["attention_logit_certified"]
            assert block["attention_logit_observed"] >= block["attention_logit_observed_signed_max"]
        assert result["bound"] == pytest.approx(load_run(settings(result["checkpoint"], None), result["checkpoint"]).saved.net.certified_bound())
    assert "| block | activation RMS: certified | observed |" in (tmp_path / "certify.md").read_text()
    assert (tmp_path / "certify.png").stat().st_size > 0


def test_a_language_model_certifies_next_tokens_at_a_radius_with_the_ball_it_needs(tiny_checkpoints, tmp_path):  # noqa: F811
    from lipschitz_lightning.robustness.certified import margins

    path = tiny_checkpoints["unconstrained"]
    radius = 1e-5  # where some of a 4-step model's margins (up to ~0.4) clear sqrt(2) L_l2 radius
    result = next(iter(C.certify(settings(path, tmp_path, lm_radius=radius)).values()))
    at = result["at_radius"]
    loaded = load_run(settings(path, None), path)
    net = precision.frozen(loaded.saved.net)
    assert at["input_radius"] == pytest.approx(result["input_radius"] + radius)
    assert at["bound"] == pytest.approx(net.certificate(perturbation=radius).bound) and at["bound"] > result["bound"]
    # by hand over the full logits: a position is certified when its margin clears sqrt(2) L_l2 radius
    margin = math.sqrt(2) * net.certificate(perturbation=radius).bound * math.sqrt(net.config.vocab_size) * radius
    certified = total = 0
    for index, (tokens, targets) in enumerate(loaded.datamodule.val_dataloader()):
        if index >= 2:
            break
        logits = net(tokens, window=net.window_blocks(1.0)).flatten(0, 1)
        certified += int((margins(logits, targets.flatten()) > margin).sum())
        total += targets.numel()
    assert at["positions"] == total and at["certified_acc"] == pytest.approx(certified / total)
    assert 0 < at["certified_acc"] < at["accuracy"]
    page = (tmp_path / "certify.md").read_text()
    assert f"for inputs of token RMS <= {result['input_radius']:.3g}" in page and "next-token predictions certified" in page
    # trained without a margin and no lm_radius: nothing at a radius
    assert next(iter(C.certify(settings(path, tmp_path)).values()))["at_radius"] is None


def test_a_language_model_above_its_certificate_fails_loudly(tiny_checkpoints, tmp_path, monkeypatch):  # noqa: F811
    real = GPT.certificate

    def too_small(self, norms=None, **kwargs):
        c = real(self, norms, **kwargs)
        return type(c)(c.bound, c.input_radius, tuple(r / 1e3 for r in c.activation_rms), c.attention_logit)

    monkeypatch.setattr(GPT, "certificate", too_small)
    with pytest.raises(CertificateBroken, match=r"^certificate broken: .*: block 0 reached activation rms .* above its certified bound"):
        C.certify(settings(tiny_checkpoints["constrained"], tmp_path))


def test_absolute_logits_are_recorded_and_the_model_is_left_as_it_was(tiny_checkpoints):  # noqa: F811
    from lipschitz_lightning.models import gpt

    from lipschitz_lightning.lit.checkpoints import load_network

    original = gpt.explicit_attention
    net = precision.frozen(load_network(tiny_checkpoints["constrained"]).net)
    tokens = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    observed = observe.observe_language_model(net, [(tokens, tokens)], max_batches=1, stats_tokens=8)
    assert gpt.explicit_attention is original
    # against the logits written out by hand: the first 8 tokens, causal, for each layer's q and k
    stats: dict = {}
    with torch.no_grad():
        net(tokens[:, :8], stats=stats)
    for l in range(2):
        assert observed[f"attention/max_logit_{l}"] == pytest.approx(float(stats[f"attention/max_logit_{l}"]))
        assert observed[f"attention/max_abs_logit_{l}"] >= observed[f"attention/max_logit_{l}"]
