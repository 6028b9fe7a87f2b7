"""A user's first hour, without silent failure: resume, short runs, missing data, the README's
commands, train.log, evaluation, progress."""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, QUIET_TRAINER
from lipschitz_lightning.data import CIFAR10DataModule, ShakespeareDataModule
from lipschitz_lightning.data import cifar10, common, shakespeare
from lipschitz_lightning.errors import ConfigError, DataError
from lipschitz_lightning.commands.train import build, train
from lipschitz_lightning.lit.callbacks import StepProgressBar
from test_training import StopAfter

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_dir: Path) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={data_dir / 'cache'}",
        "data.batch_size=32",
        "data.val_batch_size=64",
        "model.net.width=32",
        "trainer.log_every_n_steps=1",
        *QUIET_TRAINER,
    ]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_command(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


# ----------------------------------------------------------------------------- 1. resume


@pytest.fixture(scope="module")
def stopped_run(tiny_cifar, tmp_path_factory) -> Path:
    return stop_a_run(tiny_cifar, tmp_path_factory.mktemp("stopped") / "run")


def stop_a_run(tiny_cifar: Path, run_dir: Path) -> Path:
    """A run of 8 steps (linear decay to 0 at step 8) stopped at step 4, as a killed job would be,
    in a run directory as train.py leaves it (its overrides in .hydra/overrides.yaml)."""
    overrides = [*tiny_overrides(tiny_cifar), "trainer.max_steps=8", "trainer.val_check_interval=4"]
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    run = build(compose_train(*overrides, f"paths.output_dir={run_dir}"))
    run.trainer.callbacks.append(StopAfter(4))
    summary = train(run.cfg, run)
    assert summary["step"] == 4 and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    return run_dir


@pytest.mark.slow
def test_resume_without_overrides_continues_the_run_with_its_own_settings(stopped_run):
    # the case: resumed without the first run's trainer.max_steps=8, the run must not train
    # on at learning rate 0; resume=<run dir> re-reads the run's overrides and continues in place
    before = torch.load(stopped_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    result = run_command(["train.py", f"resume={stopped_run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dirpath has changed" not in result.stderr + result.stdout
    after = torch.load(stopped_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 8
    assert all(not torch.equal(before[k], after["state_dict"][k]) for k in before if k.startswith("net."))
    with (stopped_run / "csv" / "resumed-step4" / "metrics.csv").open() as handle:
        rates = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(handle) if r["train/lr"]}
    assert rates and all(rate > 0 for rate in rates.values())
    assert (stopped_run / "csv" / "metrics.csv").is_file(), "the first part's metrics must survive the resume"
    assert json.loads((stopped_run / "summary.json").read_text())["step"] == 8


def test_resume_with_another_schedule_is_one_line_not_a_frozen_run(stopped_run, tiny_cifar, tmp_path):
    checkpoint = stopped_run / "checkpoints" / "last.ckpt"
    # ckpt_path without the first run's overrides: max_steps 2000 against a schedule ending at 8
    cfg = compose_train(*tiny_overrides(tiny_cifar), f"ckpt_path={checkpoint}", f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"trainer\.max_steps is 2000, but the checkpoint's learning rate decays to 0 at step 8") as error:
        train(cfg)
    assert "\n" not in str(error.value)
    # a setting the checkpoint would silently override
    cfg = compose_train(*tiny_overrides(tiny_cifar), "trainer.max_steps=8", "optimizer.lr=0.1", f"ckpt_path={checkpoint}",
                        f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"^optimizer\.lr is 0\.1 here but 0\.2"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_following_the_resume_advice_resumes(tiny_cifar, tmp_path):
    """Each refusal's advice, taken as written, leads to the next and then to a resumed run: no advice
    ends in another refusal of the same run."""
    checkpoint = stop_a_run(tiny_cifar, tmp_path / "stopped") / "checkpoints" / "last.ckpt"
    args = [*tiny_overrides(tiny_cifar), "optimizer.lr=0.1", f"ckpt_path={checkpoint}", f"paths.output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"^optimizer\.lr is 0\.1 here but .*: .*drop the override"):
        train(compose_train(*args))
    args.remove("optimizer.lr=0.1")
    with pytest.raises(ConfigError, match=r"give trainer\.max_steps=8,") as schedule:
        train(compose_train(*args))
    args.append(re.search(r"give (trainer\.max_steps=\d+)", str(schedule.value)).group(1))
    summary = train(compose_train(*args))
    assert summary["step"] == 8


# ----------------------------------------------------------------------------- 2. short runs


def test_a_run_shorter_than_the_validation_interval_checkpoints_its_final_step(make_config):
    summary = train(make_config("trainer.max_steps=3", "trainer.val_check_interval=100"))
    assert summary["checkpoint"] and checkpoint_step(Path(summary["checkpoint"])) == 3
    assert summary["step"] == 3 and "val/acc" in summary


def test_the_last_steps_after_the_last_validation_are_checkpointed(make_config):
    summary = train(make_config("trainer.max_steps=5", "trainer.val_check_interval=2"))
    assert checkpoint_step(Path(summary["checkpoint"])) == 5


# ----------------------------------------------------------------------------- 4. missing data


def test_offline_missing_data_is_one_line_within_seconds_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cifar10, "_download", lambda scratch: pytest.fail("offline: nothing may be downloaded"))
    # "within seconds": no connection is even tried (a timeout would be the slow part)
    monkeypatch.setattr(common.socket, "create_connection", lambda *args, **kwargs: pytest.fail("offline: no connection may be tried"))
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=1 is set") as error:
        CIFAR10DataModule(str(tmp_path / "nodata"), cache_dir=str(tmp_path / "cache")).prepare_data()
    assert "\n" not in str(error.value) and "paths.data_dir" in str(error.value)
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "cache").exists()


def test_unreachable_host_is_checked_once_not_retried(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    tries = []

    def unreachable(address, timeout=None):
        tries.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(common.socket, "create_connection", unreachable)
    monkeypatch.setattr(shakespeare, "_download", lambda scratch: pytest.fail("unreachable: nothing may be downloaded"))
    with pytest.raises(DataError, match=r"raw\.githubusercontent\.com cannot be reached"):
        ShakespeareDataModule(str(tmp_path / "nodata")).prepare_data()
    assert len(tries) == 1  # one try with a short timeout, then the error: within seconds and not (tmp_path / "nodata").exists()


@pytest.mark.slow
def test_a_run_that_fails_on_missing_data_leaves_no_run_directory(tmp_path):
    result = run_command(
        ["train.py", f"paths.data_dir={tmp_path / 'nodata'}", f"paths.log_dir={tmp_path / 'logs'}"],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CIFAR-10 parquet files not found") and "HF_HUB_OFFLINE" in last
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "logs").exists()


def test_wandb_without_a_key_is_one_line_before_anything_is_built(tmp_path, monkeypatch):
    """A new user's logger=wandb, with no key anywhere W&B looks (a fresh HOME, no WANDB_* variables):
    one line naming both ways on, and no run directory. Each way it names then passes the check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "train.py", "logger=wandb", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**env, "HOME": str(home)},
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: logger=wandb has no W&B key"), result.stderr
    assert "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not (tmp_path / "logs").exists()

    from lipschitz_lightning.config.settings import check_wandb_can_log

    cfg = compose_train("logger=wandb")
    for name in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings of the checkout's
    with pytest.raises(ConfigError, match="no W&B key"):
        check_wandb_can_log(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_can_log(cfg)
    monkeypatch.delenv("WANDB_MODE")
    home.mkdir(exist_ok=True)
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    (home / ".netrc").chmod(0o600)
    check_wandb_can_log(cfg)  # what `wandb login` writes


# ----------------------------------------------------------------------------- 5. the README's commands


# the pages whose commands must run as written (docs/paper_code_timing.md runs the paper's code)
DOCUMENTED = ("README.md", *(f"docs/{page}.md" for page in ("configuration", "shakespeare", "nanogpt", "sweeps", "certify", "constraints", "speed", "api", "claims", "quantization")))


def readme_commands() -> list[tuple[dict, list[str]]]:
    """Every ``python ...`` command of the fenced shell blocks of the README and the documented pages:
    (environment, arguments)."""
    text = "\n".join((REPO / page).read_text() for page in DOCUMENTED)
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if not re.search(r"(^|\s)(python|\.venv/bin/python)\s", part):
                    continue  # not a command, or not python (pip, wandb, plain output)
                # bash's $'...' (a newline in a prompt): shlex knows only plain quotes
                part = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), part)
                tokens = shlex.split(part, comments=True)
                env = {}
                while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
                    key, value = tokens.pop(0).split("=", 1)
                    env[key] = value
                if tokens and tokens[0] in ("python", ".venv/bin/python") and (env, tokens[1:]) not in commands:
                    commands.append((env, tokens[1:]))
    return commands


def single_runs(args: list[str]) -> list[list[str]]:
    """A multirun's command as single runs: each swept value once, the other axes at their first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    app, args = (args[:2], args[2:]) if args[0] == "-m" else (args[:1], args[1:])
    args = [*app, *(a for a in args if a not in ("-m", "--multirun"))]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = {o.get_key_element(): list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()] for o in parsed}
    runs = []
    for key, options in values.items():
        for option in options[1:] if runs else options:
            chosen = {k: (option if k == key else v[0]) for k, v in values.items()}
            runs.append([a for a in args if a not in overrides] + [f"{k}={v}" for k, v in chosen.items()])
    return runs or [args]


@pytest.mark.slow
def test_every_readme_command_composes(tmp_path):
    # composition only (--cfg job): the README cannot drift from the configs again
    fake_run = tmp_path / "run"
    (fake_run / ".hydra").mkdir(parents=True)
    (fake_run / ".hydra" / "overrides.yaml").write_text("[]\n")
    (fake_run / "checkpoints").mkdir()
    (fake_run / "checkpoints" / "last.ckpt").write_bytes(b"")
    commands = readme_commands()
    assert len(commands) >= 10
    # the commands say `python` and no data folder: the README says first how to get both
    text = (REPO / "README.md").read_text()
    first_bare = re.search(r"^python ", text, flags=re.M).start()
    assert "source .venv/bin/activate" in text[:first_bare] and "export LIPSCHITZ_DATA_DIR=" in text[:first_bare]
    hydra_apps = ("train.py", "lipschitz_lightning.sample", "lipschitz_lightning.commands.evaluate", "lipschitz_lightning.commands.certify")
    runs = []
    for env, args in commands:
        args = [re.sub(r"[^\s=]*<run>", str(fake_run), a) for a in args]
        args = [re.sub(r"<([\w-]+)>", r"\1", a) for a in args]
        if args[0] == "-m" and args[1] == "pytest":
            continue
        app = args[0] if args[0] != "-m" else args[1]
        if app in hydra_apps:
            runs += [(env, [*run, "--cfg", "job"]) for run in single_runs(args)]
        elif app.startswith("lipschitz_lightning."):
            runs.append((env, [*args[:2], "--help"]))  # an argparse tool: it must exist and parse
        else:
            runs.append((env, ["-c", f"raise SystemExit({shlex.join(args)!r} + ': not a command of this project')"]))

    def failure(env_args) -> str | None:
        env, args = env_args
        result = run_command(args, env={"LIPSCHITZ_DATA_DIR": "../shared/data", **env}, timeout=120)
        return None if result.returncode == 0 else f"{shlex.join(args)}: {result.stderr.strip()[-500:]}"

    with ThreadPoolExecutor(max_workers=2) as pool:  # each command is a start-up, mostly one core's imports
        failures = [f for f in pool.map(failure, runs) if f]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- 6. train.log, 7. evaluate


@pytest.fixture(scope="module")
def command_line_run(tiny_cifar, tmp_path_factory):
    """``python train.py`` as a user types it: 3 steps, fewer than the validation interval (100)."""
    log_dir = tmp_path_factory.mktemp("cli")
    result = run_command(["train.py", *tiny_overrides(tiny_cifar), "trainer.max_steps=3", f"paths.log_dir={log_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in log_dir.rglob("summary.json")]
    return result, run_dir


@pytest.mark.slow
def test_train_log_holds_what_the_console_showed(command_line_run):
    result, run_dir = command_line_run
    logged = (run_dir / "train.log").read_text()
    summary = [line for line in result.stdout.splitlines() if line.startswith(("step 3:", "certified", "logs:", "checkpoint:"))]
    assert len(summary) == 4 and "checkpoint: None" not in summary
    assert all(line in logged for line in summary)
    assert "`Trainer.fit` stopped" in logged  # Lightning's notices too


@pytest.mark.slow
def test_evaluate_prints_the_checkpoints_loss_accuracy_and_bound(command_line_run, tiny_cifar):
    _, run_dir = command_line_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    result = run_command(["-m", "lipschitz_lightning.evaluate", f"ckpt_path={checkpoint}", f"paths.data_dir={tiny_cifar}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"step 3: val accuracy {summary['val/acc']:.4f}, val loss {summary['val/loss']:.4f}" in result.stdout
    assert f"certified Lipschitz bound {summary['lipschitz/bound']:.4g}" in result.stdout


@pytest.mark.slow
def test_evaluate_errors_are_one_line(tmp_path):
    result = run_command(["-m", "lipschitz_lightning.evaluate", f"ckpt_path={tmp_path / 'missing.ckpt'}"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: ckpt_path must be an existing checkpoint file, got '{tmp_path / 'missing.ckpt'}'"


# ----------------------------------------------------------------------------- 8. progress


def test_progress_bar_counts_steps_and_shows_accuracy_and_bound(tiny_cifar, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_cifar) if o not in QUIET_TRAINER]
    run = build(compose_train(*overrides, "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.progress_bar.refresh_rate=1",
                              "+trainer.enable_model_summary=false", f"paths.output_dir={tmp_path / 'run'}"))
    train(run.cfg, run)
    (bar,) = [c for c in run.trainer.callbacks if isinstance(c, StepProgressBar)]
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)
    shown = bar.get_metrics(run.trainer, run.module)
    assert {"val/acc", "lipschitz/bound"} <= shown.keys() and "v_num" not in shown


@pytest.mark.slow
def test_a_multirun_prints_one_line_per_finished_job(tiny_cifar, tmp_path):
    result = run_command(["train.py", "-m", *tiny_overrides(tiny_cifar), "trainer.max_steps=2", "constraint.w_max=2,0", f"paths.log_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^job 0 done: muon \+ spectral_soft_cap, w_max=2: val accuracy 0\.\d{4}, bound [\d.e+-]+ \(step 2, ", result.stdout, re.M)
    assert re.search(r"^job 1 failed: muon \+ spectral_soft_cap, w_max=0: ConfigError: constraint\.w_max must be", result.stderr, re.M)
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.rglob("summary.json"))
    assert statuses == ["completed", "failed"]  # a sweep still records its failed runs
