"""Every command's bad value is one line ``error: <key> ...`` and exit status 1, decided from the
command line and conf/ alone, before any model, data or run directory exists (in-process and fast;
tests/test_first_hour.py runs the same through real processes)."""

from __future__ import annotations

import pytest

from lipschitz_lightning.commands.cli import command_main
from lipschitz_lightning.config.compose import check_composition
from lipschitz_lightning.config.settings import check_train_settings, validate_config
from lipschitz_lightning.errors import ConfigError


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=5"], "model=5 is not an option of model; allowed: gpt, mlp, nanogpt"),
        (["callbacks=5"], "callbacks=5 is not an option of callbacks; allowed: default"),
        (["constraint=spectral_magic"], "constraint=spectral_magic is not an option of constraint; allowed: none, "),
        (["optimizer=adamw", "optimizer.momentum=0.9"], "optimizer.momentum is not a setting of optimizer=adamw; allowed: "),
        # with +, Hydra adds the key and the optimizer's own settings refuse it (train.py names the
        # option, optimizer=adamw, from Hydra's choices; outside the app it is the class)
        (["optimizer=adamw", "+optimizer.momentum=0.9"], "optimizer.momentum is not a setting of AdamW; allowed: lr, betas, eps, variant, weight_decay"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["trainer.max_steps=0"], "trainer.max_steps must be an integer >= 1, got 0"),
        (["+trainer.foo=1"], "trainer.foo is not an argument of Lightning's Trainer; allowed: accelerator, "),
        (["+trainer.gradient_clip_val=abc"], "trainer.gradient_clip_val must be a number"),
        (["+trainer.detect_anomaly=maybe"], "trainer.detect_anomaly must be true or false, got 'maybe'"),
        (["constraint.w_max=0"], "constraint.w_max must be a number > 0, got 0"),
        (["model.net.width=-3"], "model.net.width must be an integer >= 1, got -3"),
        (["loss=certified_margin", "loss.radius=abc"], "loss.radius must be a number >= 0 or a fraction such as 36/255, got 'abc'"),
        (["loss.temperature=0"], "loss.temperature must be a number > 0, got 0"),
        (["loss=cross_entropy", "loss.radius=0.1"], "loss.radius is not a setting of loss=cross_entropy; allowed: temperature"),
        (["loss=hinge"], "loss=hinge is not an option of loss; allowed: certified_margin, cross_entropy"),
        (["data.holdout=60000"], "data.holdout must be an integer in [0, 49000], got 60000"),
        (["data.flip=maybe"], "data.flip must be true or false, got 'maybe'"),
        (["optimized_metrics=[]"], "optimized_metrics must be a non-empty list"),
    ],
)
def test_train_refuses_a_bad_command_line_in_one_line(args, message, tmp_path):
    # train.py's order: the composition and train.yaml's own keys before torch, the targets' settings
    # (which their modules declare) as soon as the app has the config, before anything is built
    with pytest.raises(ConfigError) as error:
        composed = check_composition("train", [*args, f"paths.output_dir={tmp_path / 'run'}"])
        check_train_settings(composed)
        validate_config(composed)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_good_command_line_passes_and_a_trainer_argument_goes_through(tmp_path):
    composed = check_composition("train", ["optimizer=adamw", "+trainer.gradient_clip_val=0.5", f"paths.output_dir={tmp_path}"])
    check_train_settings(composed)
    validate_config(composed)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("sample", ["ckpt_path=x", "num_tokens=abc"], "num_tokens must be an integer >= 0, got 'abc'"),
        ("sample", ["ckpt_path=x", "prompt="], "prompt must be a non-empty string, got ''"),
        ("sample", ["ckpt_path=x", "temperature=-1"], "temperature must be a number >= 0, got -1"),
        ("evaluate", ["ckpt_path=x", "data=foo"], "data holds settings, not one value: give data.<setting>=<value>; its settings: val_batch_size"),
        ("evaluate", ["ckpt_path=x", "device=tpu"], "device must be one of "),
        ("certify", ["ckpt_path=x", "attack=3"], "attack holds settings, not one value: give attack.<setting>=<value>; its settings: steps, "),
        ("certify", ["ckpt_path=[a,'']"], "ckpt_path must be a non-empty string or a non-empty list, each a non-empty string, got ['a', '']"),
        ("certify", ["ckpt_path=x", "radii=[-1]"], "radii.0 must be a number > 0, got -1"),
        ("certify", ["ckpt_path=x", "attack.stepz=3"], "attack.stepz is not a setting of "),
        ("certify", ["ckpt_path=x", "--verbose"], "--verbose is not an option of this command"),
    ],
)
def test_sample_evaluate_and_certify_refuse_a_bad_value_in_one_line(command, args, message, capsys):
    with pytest.raises(SystemExit) as exit_status:
        command_main(command, args)
    assert exit_status.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
