"""The loss as part of the tradeoff (conf/loss/), the data options a CIFAR user expects, and the
searched frontier (sweeps/hparams_search/): docs/certified_training.md's claims, checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ascend_ratio
from lipschitz_lightning.commands import report
from lipschitz_lightning.core.losses import CertifiedMargin, CrossEntropy, linear_cross_entropy
from lipschitz_lightning.core.types import parse_radius
from lipschitz_lightning.data.cifar10 import crop_and_flip
from lipschitz_lightning.models import MLP
from lipschitz_lightning.robustness.attacks import pgd_l2
from lipschitz_lightning.robustness.certified import certified, l2_bound, margins

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the losses


def test_default_cross_entropy_is_plain_cross_entropy_bit_for_bit():
    logits, targets = torch.randn(64, 10), torch.randint(0, 10, (64,))
    loss, correct, certified = CrossEntropy()(logits, targets)
    assert torch.equal(loss, F.cross_entropy(logits, targets))
    assert correct == (logits.argmax(1) == targets).sum() and certified == correct


def test_the_certified_margin_loss_is_the_issue_s_formula():
    # CE(tau * (z + m * (1 - onehot(y)))), written out in plain PyTorch
    torch.manual_seed(0)
    logits, targets = torch.randn(64, 10, requires_grad=True), torch.randint(0, 10, (64,))
    loss_fn = CertifiedMargin(radius="36/255", temperature=7.0)
    margin = loss_fn.margin(1.3)
    assert margin == pytest.approx(math.sqrt(2) * 1.3 * 36 / 255)
    loss, correct, counted = loss_fn(logits, targets, margin)
    expected = F.cross_entropy(7.0 * (logits + margin * (1 - F.one_hot(targets, 10).float())), targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert counted == (margins(logits.detach(), targets) > margin).sum()
    assert correct == (logits.detach().argmax(1) == targets).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("text, value", [("36/255", 36 / 255), ("0.5/1", 0.5), (" 72 / 255 ", 72 / 255)])
def test_a_radius_may_be_written_as_certify_reports_it(text, value):
    assert parse_radius(text) == pytest.approx(value)
    assert parse_radius(0.25) == 0.25


@pytest.mark.parametrize("text", ["abc", "36/0", "-1/255", "1/2/3"])
def test_a_radius_that_is_no_fraction_is_refused(text):
    with pytest.raises(ValueError, match="a radius must be"):
        parse_radius(text)


@pytest.mark.parametrize("margin, temperature", [(0.0, 1.0), (0.0, 4.0), (0.7, 10.0)])
def test_the_chunked_language_model_loss_takes_the_temperature_and_margin(margin, temperature):
    torch.manual_seed(0)
    features = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    loss_fn = CertifiedMargin(radius=1.0, temperature=temperature)
    loss, correct, counted = linear_cross_entropy(features, weight, targets, 0.5, 8, loss_fn, margin)
    logits = 0.5 * features @ weight.T
    expected = F.cross_entropy(temperature * (logits - margin * F.one_hot(targets, 50)), targets)
    torch.testing.assert_close(loss, expected)
    assert counted == (margins(logits.detach(), targets) > margin).sum()
    assert correct == (logits.detach().argmax(1) == targets).sum()
    torch.testing.assert_close(torch.autograd.grad(loss, (features, weight)), torch.autograd.grad(expected, (features, weight)))


# ------------------------------------------- the derivation's claim, on a small network


def test_a_point_the_loss_counts_as_certified_is_certified_and_survives_the_attack(single_torch_thread):
    """docs/certified_training.md: margin > sqrt(2) L_l2 r  =>  no input within l2 distance r changes
    the class. Train a small MLP with the margin loss, then check every point the loss counts against
    certify's check (exact bound from an SVD of each layer, not the network's own method) and PGD."""
    torch.manual_seed(0)
    net = MLP(input_dim=48, width=32, num_layers=3, num_classes=10, zero_init=False)
    teacher = torch.randn(48, 10)
    x = torch.rand(512, 48)
    y = (x @ teacher).argmax(1)
    radius = 0.05
    loss_fn = CertifiedMargin(radius=radius, temperature=10.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        margin = loss_fn.margin(net.logit_l2_bound())
        loss, _, counted = loss_fn(net(x), y, margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        logits = net(x)
    by_svd = math.prod(float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)) for layer in net.layers)
    assert net.logit_l2_bound() == pytest.approx(by_svd, rel=1e-6)
    assert l2_bound(net.certified_bound(), 48, 10) == pytest.approx(by_svd, rel=1e-6)
    margin = loss_fn.margin(net.logit_l2_bound())
    _, _, counted = loss_fn(logits, y, margin)
    safe = certified(margins(logits, y), by_svd, radius)
    assert counted == safe.sum()
    assert 0.2 < safe.float().mean() < 1.0, "the check must see both certified and uncertified points"
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    broken, _ = pgd_l2(net, x[safe], y[safe], radius, steps=50, restarts=2)
    assert not broken.any(), "a point the loss counted as certified was broken within its radius"
    # the attack is strong enough to matter: at a few times the radius it breaks some of them
    broken, _ = pgd_l2(net, x[safe], y[safe], 5 * radius, steps=50, restarts=2)
    assert broken.any()


def test_the_module_logs_the_certified_fraction_of_training_and_validation(make_config, tmp_path):
    from lipschitz_lightning.commands.train import build, train

    cfg = make_config("loss=certified_margin", "loss.radius=0.02", "loss.temperature=5", "trainer.max_steps=6",
                      "trainer.val_check_interval=3")
    summary = train(cfg, build(cfg))
    assert 0.0 <= summary["val/certified_acc"] <= summary["val/acc"]
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "train/certified" in header and "train/margin" in header
    margins_logged = [float(r.split(",")[header.index("train/margin")]) for r in rows[1:] if r.split(",")[header.index("train/margin")]]
    assert margins_logged and all(m >= 0 for m in margins_logged)


# ----------------------------------------------------------------------------- the data


@pytest.mark.parametrize("padding, flip", [(2, True), (0, True), (3, False)])
def test_crop_and_flip_equals_the_per_image_reference(padding, flip):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 8, 6, 3), dtype=torch.uint8)
    out = crop_and_flip(images, padding, flip, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    shifts = torch.randint(0, 2 * padding + 1, (2, 16), generator=generator)
    flips = torch.rand(16, generator=generator) < 0.5 if flip else torch.zeros(16, dtype=torch.bool)
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    for i in range(16):
        expected = padded[i, shifts[0, i] : shifts[0, i] + 8, shifts[1, i] : shifts[1, i] + 6]
        if flips[i]:
            expected = expected.flip(1)
        assert torch.equal(out[i], expected)
    assert not flip or 0 < int(flips.sum()) < 16


def test_every_micro_batch_and_every_rank_draws_its_own_crops_and_a_resume_draws_them_again():
    from types import SimpleNamespace

    from lipschitz_lightning.data.cifar10 import CIFAR10DataModule

    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(64, dtype=torch.int64)

    def augmented(datamodule, step: int, rank: int = 0) -> torch.Tensor:
        datamodule.trainer = SimpleNamespace(training=True, global_step=step, global_rank=rank)
        return datamodule.on_after_batch_transfer((images, labels), 0)[0]

    def fresh() -> CIFAR10DataModule:
        return CIFAR10DataModule(data_dir="unused", crop_padding=4, flip=True, seed=3)

    run = fresh()
    first, second = augmented(run, 7), augmented(run, 7)  # two micro-batches of one accumulated step
    next_step = augmented(run, 8)
    assert not torch.equal(first, second) and not torch.equal(first, next_step)
    assert not torch.equal(first, augmented(fresh(), 7, rank=1))  # another DDP rank, same step
    resumed = fresh()  # a resumed run starts at a step boundary
    assert torch.equal(augmented(resumed, 7), first) and torch.equal(augmented(resumed, 7), second)


def test_augmentation_is_off_by_default_and_held_out_validation_reports_the_test_split(make_config, tiny_cifar):
    from hydra.utils import instantiate

    plain = instantiate(make_config().data)
    assert (plain.crop_padding, plain.flip, plain.holdout) == (0, False, 0)
    plain.setup()
    assert not plain.holds_out_validation and "test" not in plain.splits

    held = instantiate(make_config("data.holdout=56").data)
    held.setup()
    assert (len(held.splits["train"]), len(held.splits["val"]), len(held.splits["test"])) == (200, 56, 128)
    # the held-out images are the last of the training split, and never trained on
    assert torch.equal(held.splits["val"].tensors[0], plain.splits["train"].tensors[0][200:])
    assert torch.equal(held.splits["test"].tensors[0], plain.splits["val"].tensors[0])


def test_a_held_out_run_reports_test_accuracy(make_config):
    from lipschitz_lightning.commands.train import build, train

    cfg = make_config("data.holdout=64", "data.crop_padding=4", "data.flip=true", "loss.temperature=10")
    summary = train(cfg, build(cfg))
    assert 0 <= summary["test/acc"] <= 1 and 0 <= summary["val/acc"] <= 1
    assert summary["lipschitz/log10_bound"] == pytest.approx(math.log10(summary["lipschitz/bound"]))


# ----------------------------------------------------------------------------- the search


def search(tmp_path: Path, data_dir: Path, trials: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "+hparams_search=muon_spectral_soft_cap", f"search.trials={trials}",
         f"paths.data_dir={data_dir}", f"paths.cache_dir={data_dir / 'cache'}", f"paths.log_dir={tmp_path}",
         "data.holdout=64", "data.batch_size=32", "data.val_batch_size=64", "model.net.width=32",
         "trainer.max_steps=20", "trainer.val_check_interval=10", "~callbacks.progress_bar",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_a_three_trial_search_writes_its_study_resumes_it_and_the_report_reads_it(tiny_cifar, tmp_path):
    from lipschitz_lightning.commands import studies

    result = search(tmp_path, tiny_cifar, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "cifar_frontier" / "searches" / "muon_spectral_soft_cap"
    study = studies.load(f"sqlite:///{folder / 'study.db'}", "muon_spectral_soft_cap")  # Optuna's public API
    assert studies.trial_states(study) == {"COMPLETE": 3}
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and study.metric_names == ["val/acc", "lipschitz/log10_bound"]
    summaries = [json.loads(p.read_text()) for p in sorted(folder.glob("trial-*/summary.json"))]
    assert len(summaries) == 3 and all("test/acc" in s and "lipschitz/log10_bound" in s for s in summaries)
    # the study was told each trial's objectives, and where its run is
    for trial, summary in zip(study.trials, summaries):
        assert trial.values == [summary["val/acc"], summary["lipschitz/log10_bound"]]
        assert trial.user_attrs["run_dir"] == summary["output_dir"] == str(folder / f"trial-{trial.number:03d}")
    # every trial drew its own settings, validated on held-out images; the command line's steps held
    assert len({s["config"]["optimizer"]["lr"] for s in summaries}) == 3
    assert all(s["config"]["data"]["holdout"] == 64 and s["step"] == 20 for s in summaries)

    # the same command with one more trial in all runs only that one, and draws new settings
    result = search(tmp_path, tiny_cifar, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in folder.glob("trial-*/summary.json")]
    assert len(summaries) == 4 and len({s["config"]["optimizer"]["lr"] for s in summaries}) == 4
    assert "3 of 4 trials completed, 1 to run" in result.stdout

    rows = report.collect([tmp_path / "cifar_frontier" / "searches"])
    assert len(rows) == 4 and {r.source for r in rows} == {"muon_spectral_soft_cap"}
    assert any(r.on_frontier for r in rows)
    table = report.markdown(rows, report.study_counts([tmp_path]))
    assert "search muon_spectral_soft_cap (muon + spectral_soft_cap): 4 trials (4 complete)" in table


def _summary(directory: Path, pair: tuple[str, str], knob: float, accuracy: float, bound: float, **extra) -> None:
    optimizer, constraint = pair
    directory.mkdir(parents=True)
    config = {
        "optimizer": {"_target_": f"lipschitz_lightning.optim.{optimizer}", "lr": 0.1, "weight_decay": 0.0},
        "constraint": {"method": constraint, "w_max": knob},
        "loss": {"temperature": 10.0, "radius": "36/255"},
    }
    (directory / "summary.json").write_text(json.dumps(
        {"status": "completed", "step": 10, "val/acc": accuracy, "lipschitz/bound": bound, "config": config, **extra}))


def _study(folder: Path, name: str, states: list[str], record: bool = True):
    """A study in ``folder`` (SQLite) whose trials end in ``states``, made through Optuna's API."""
    import optuna

    from lipschitz_lightning.commands import studies

    folder.mkdir(parents=True, exist_ok=True)
    storage = studies.default_storage(folder)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    for state in states:
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        if state == "COMPLETE":
            study.tell(trial, [0.5, 1.0])
        elif state == "FAIL":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # RUNNING: left as a killed trial leaves it
    if record:
        studies.StudyRecord(name, storage).write(folder)
    return study


def test_the_report_marks_each_source_s_pareto_points_and_counts_trials(tmp_path):
    grid, searched = tmp_path / "grid", tmp_path / "searches" / "study_a"
    _summary(grid / "0", ("Muon", "spectral_soft_cap"), 2.0, 0.50, 8.0)
    _summary(grid / "1", ("Muon", "spectral_soft_cap"), 4.0, 0.55, 60.0)
    _study(searched, "study_a", ["COMPLETE", "COMPLETE", "FAIL"])
    # held-out validation: the row's accuracy is the test split's
    _summary(searched / "trial-a", ("Muon", "spectral_soft_cap"), 2.0, 0.70, 7.0, **{"test/acc": 0.58, "test/certified_acc": 0.4})
    _summary(searched / "trial-b", ("Muon", "spectral_soft_cap"), 2.0, 0.60, 9.0, **{"test/acc": 0.50})
    rows = {r.run: r for r in report.collect([grid, tmp_path / "searches"])}
    assert rows["grid/0"].on_frontier and rows["grid/1"].on_frontier  # the grid's frontier, apart from the search's
    assert rows["searches/study_a/trial-a"].accuracy == 0.58 and rows["searches/study_a/trial-a"].on_frontier
    assert not rows["searches/study_a/trial-b"].on_frontier
    assert rows["searches/study_a/trial-a"].radius == pytest.approx(36 / 255)
    table = report.markdown(list(rows.values()), report.study_counts([tmp_path]))
    assert "search study_a (muon + spectral_soft_cap): 3 trials (2 complete, 1 fail)" in table
    report.plot(list(rows.values()), tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_the_report_reads_a_study_of_hydra_s_sweeper_and_says_why_one_is_unreadable(tmp_path):
    from lipschitz_lightning.commands import studies

    _study(tmp_path / "old" / "pair_a", "pair_a", ["COMPLETE", "RUNNING"], record=False)  # study.db alone: its only study
    _summary(tmp_path / "old" / "pair_a" / "trial-x", ("Muon", "spectral_soft_cap"), 2.0, 0.6, 7.0)
    shared = tmp_path / "shared" / "pair_b"
    shared.mkdir(parents=True)
    studies.StudyRecord("pair_b", "postgresql://user:***@db.invalid/studies").write(shared)  # the password is never written
    _summary(shared / "trial-000", ("Muon", "spectral_soft_cap"), 2.0, 0.6, 7.0)
    rows = report.collect([tmp_path])
    assert {r.source for r in rows} == {"pair_a", "pair_b"}
    table = report.markdown(rows, report.study_counts([tmp_path]))
    assert "search pair_a (muon + spectral_soft_cap): 2 trials (1 complete, 1 running)" in table
    assert "search pair_b (muon + spectral_soft_cap): its study was not read: postgresql://user:***@db.invalid/studies" in table


def test_trials_left_counts_completed_trials_only(tmp_path):
    from lipschitz_lightning.commands.studies import trials_left

    study = _study(tmp_path, "s", [])
    assert trials_left(study, 5) == 5
    study = _study(tmp_path / "b", "s", ["COMPLETE", "RUNNING", "FAIL"])
    assert trials_left(study, 5) == 4  # the killed and the failed trial are run again
    assert trials_left(study, 1) == 0


SEARCHES = sorted(p.stem for p in (REPO / "sweeps" / "hparams_search").glob("*.yaml") if p.stem not in ("cifar_frontier", "certified"))


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_composes_and_its_space_s_corners_validate(name, tmp_path):
    """Each pair's search space, at the low and the high end of every interval, is a valid run."""
    from hydra import compose, initialize_config_dir

    from lipschitz_lightning import CONF_DIR
    from lipschitz_lightning.config.compose import register_resolvers
    from lipschitz_lightning.commands.search import corners, override, search_settings, search_space
    from lipschitz_lightning.config.settings import check_train_settings, validate_config

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("train", overrides=[f"+hparams_search={name}", f"paths.log_dir={tmp_path}"])
        settings = search_settings(base)
        assert settings.study_name == name and settings.trials == 40 and settings.dir == f"{tmp_path}/cifar_frontier/searches/{name}"
        assert settings.objectives == ["val/acc", "lipschitz/log10_bound"] and settings.directions == ["maximize", "minimize"]
        assert settings.sampler.target == "optuna.samplers.NSGAIISampler" and settings.sampler.model_extra == {"population_size": 8}
        assert base.data.holdout == 5000
        space = search_space(settings.params)
        assert {"loss.temperature", "loss.radius", "trainer.max_steps", "optimizer.lr"} <= space.keys()
        for end in corners(space):
            overrides = [override(key, value) for key, value in end.items()]
            cfg = compose("train", overrides=[f"+hparams_search={name}", f"paths.output_dir={tmp_path}", *overrides])
            check_train_settings(cfg)
            validate_config(cfg)
        certified = search_settings(compose("train", overrides=[f"+hparams_search=[{name},certified]", f"paths.log_dir={tmp_path}"]))
        assert certified.objectives == ["val/acc", "val/certified_acc"] and certified.directions == ["maximize", "maximize"]
        assert certified.dir == f"{tmp_path}/cifar_certified_frontier/searches/{name}" and certified.params == settings.params


def test_the_language_model_s_margin_holds_for_every_perturbation_within_its_radius():
    """For the GPT the margin certifies every position against inputs within the radius of the
    embedded sequence: a search over such perturbations moves no position's margin by more than the
    module's margin. The loss offsets the true logit by that margin, as the plain computation over
    full logits does."""
    from lipschitz_lightning.models import GPT
    from lipschitz_lightning.step import batch_loss, training_margin

    torch.manual_seed(0)
    net = GPT(vocab_size=17, num_blocks=2, width=16, num_heads=2, seq_len=8, zero_init=False)
    radius = 0.05
    loss_fn = CertifiedMargin(radius=radius, temperature=3.0)
    x, y = torch.randint(0, 17, (3, 8)), torch.randint(0, 17, (3, 8))
    margin = training_margin(net, loss_fn)

    frozen = GPT(**net.config_dict()).double()
    frozen.load_state_dict(net.state_dict())
    frozen.requires_grad_(False)
    embedded = frozen.embed(x).repeat(8, 1, 1)  # 8 starts per sequence
    start = torch.randn(24, 8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def within_radius(p: torch.Tensor) -> torch.Tensor:  # token RMS at most the radius at every position
        return p / (p.pow(2).mean(-1, keepdim=True).sqrt() / radius).clamp(min=1.0)

    def margin_move(base: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # |change of any logit difference| <= sqrt(2) * the logits' l2 change, at the worst position
        moved = frozen.forward_embedded(base + p) - frozen.forward_embedded(base)
        return math.sqrt(2) * moved.pow(2).sum(-1).sqrt().amax(-1)

    found = ascend_ratio(margin_move, embedded, start, steps=100, lr=5e-3, project=lambda b: embedded, project_b=within_radius)
    print(f"\nlargest margin move within radius {radius}: {found:.4g}; the loss's margin {float(margin):.4g}")
    assert 0 < found <= float(margin)

    loss, correct, certified_count = batch_loss(net, net.features, x, y, loss_fn, margin, 1.0, loss_chunk=5)
    logits = net(x).reshape(-1, 17)
    expected = F.cross_entropy(3.0 * (logits - float(margin) * F.one_hot(y.reshape(-1), 17)), y.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert correct == (logits.argmax(1) == y.reshape(-1)).sum()
    assert certified_count == (margins(logits.detach(), y.reshape(-1)) > margin).sum()


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_the_margin_loss_reads_no_value_back_from_the_device(monkeypatch, model):
    """On an accelerator every read of a tensor's value on the host waits for the device: the margin
    (the live bound) and the loss with it stay tensors until a logging step reads them. The whole
    step the module runs (Muon, the soft cap) reads nothing either."""
    from lipschitz_lightning.core.constraints import SpectralSoftCap
    from lipschitz_lightning.core.projection import Projection
    from lipschitz_lightning.models import GPT
    from lipschitz_lightning.optim import Muon, param_groups
    from lipschitz_lightning.step import train_step

    torch.manual_seed(0)
    if model == "mlp":
        net = MLP(input_dim=48, width=32, num_layers=3, num_classes=10, zero_init=False)
        batch, forward = (torch.rand(16, 48), torch.randint(0, 10, (16,))), net
    else:
        net = GPT(vocab_size=17, num_blocks=2, width=16, num_heads=2, seq_len=8, zero_init=False)
        batch, forward = (torch.randint(0, 17, (3, 8)), torch.randint(0, 17, (3, 8))), net.features
    optimizer = Muon(param_groups(net.param_specs()), lr=0.05)
    projection = Projection(SpectralSoftCap(w_max=2.0))
    projection.attach([optimizer], net.param_specs())

    def read_back(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    with monkeypatch.context() as patched:
        # (.numpy() of a tensor the host itself made, the guards' decisions, reads no device)
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            patched.setattr(torch.Tensor, name, read_back)
        result = train_step(net, *batch, CertifiedMargin(radius=0.05), optimizer, forward=forward, loss_chunk=5)
    assert isinstance(result.margin, torch.Tensor) and float(result.margin.max()) > 0  # per pair of classes for the MLP
    assert int(result.certified) <= int(result.correct) and math.isfinite(float(result.loss))


@pytest.mark.parametrize("shape", [(3072, 256), (256, 256), (50, 768)])
@pytest.mark.parametrize("spectrum", ["flat", "random"])
def test_the_bound_that_waits_for_no_device_is_an_upper_bound_within_its_stated_slack(shape, spectrum):
    from lipschitz_lightning.core.bounds import SYNC_FREE_SQUARINGS
    from lipschitz_lightning.core.linalg import sigma_upper_bound

    generator = torch.Generator().manual_seed(2)
    W = torch.randn(*shape, generator=generator, dtype=torch.float64)
    if spectrum == "flat":  # every singular value equal: the worst case of the Frobenius bound
        W = torch.linalg.qr(W if shape[0] >= shape[1] else W.mT)[0]
        W = (W if shape[0] >= shape[1] else W.mT) * 3.0
    exact = float(torch.linalg.matrix_norm(W, ord=2))
    bound = float(sigma_upper_bound(W, squarings=SYNC_FREE_SQUARINGS))
    assert exact * (1 - 1e-12) <= bound <= exact * 1.00013


def test_an_input_shift_is_a_translation_that_leaves_the_bound_alone():
    torch.manual_seed(0)
    shifted = MLP(input_dim=48, width=32, num_classes=10, zero_init=False, input_shift=0.5)
    plain = MLP(input_dim=48, width=32, num_classes=10, zero_init=False)
    plain.load_state_dict(shifted.state_dict())
    x, y = torch.rand(8, 48), torch.rand(8, 48)
    torch.testing.assert_close(shifted(x), plain(x - 0.5))
    assert shifted.certified_bound() == plain.certified_bound()
    # differences of outputs depend on differences of inputs only: the certified radii do not move
    torch.testing.assert_close(shifted(x) - shifted(y), plain(x - 0.5) - plain(y - 0.5))
