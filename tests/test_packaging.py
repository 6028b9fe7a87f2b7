"""The package installs anywhere: a wheel carries conf/ and sweeps/ and runs outside the checkout,
every import is declared, and what one job alone needs is an extra whose absence is one line."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lipschitz_lightning
from lipschitz_lightning.commands.extras import APART, EXTRAS, pyplot
from lipschitz_lightning.errors import ConfigError, one_line

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lipschitz_lightning"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# what the wheel is built from: pyproject.toml names README.md as the long description
SOURCES = ("pyproject.toml", "README.md", "lipschitz_lightning", "hydra_plugins", "conf", "sweeps")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group()) for r in requirements}


def test_a_checkout_reads_conf_and_sweeps_at_the_root():
    assert lipschitz_lightning.CONF_DIR == REPO / "conf" and lipschitz_lightning.SWEEPS_DIR == REPO / "sweeps"


def test_the_wheel_lists_every_package_and_carries_every_config():
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = {".".join(path.parent.relative_to(REPO).parts) for root in (PACKAGE, REPO / "hydra_plugins")
               for path in root.rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"lipschitz_lightning.conf", "lipschitz_lightning.sweeps"}
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()  # a namespace package, as Hydra's plugins share it
    assert setuptools["package-dir"] == {"lipschitz_lightning.conf": "conf", "lipschitz_lightning.sweeps": "sweeps"}
    for package, folder in setuptools["package-dir"].items():
        # every file a command reads from conf/ or sweeps/ is a yaml file, and the glob takes them all
        assert setuptools["package-data"][package] == ["**/*.yaml"]
        assert any((REPO / folder).rglob("*.yaml"))


def test_the_console_scripts_name_the_commands():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {f"lipschitz-{name}" for name in ("train", "evaluate", "certify", "sample", "report", "benchmark", "quantize")}
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == f"lipschitz_lightning.{script.removeprefix('lipschitz-')}"
        assert callable(getattr(importlib.import_module(module), function))


def third_party_imports() -> dict[str, set[str]]:
    """Every top-level module the package imports that is neither the standard library nor its own,
    with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("lipschitz_lightning", "hydra_plugins"):  # both this project's
                    found.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_every_import_is_declared_and_the_extras_are_imported_only_where_used():
    project = PYPROJECT["project"]
    required = requirement_names(project["dependencies"])
    extras = {extra: requirement_names(requirements) for extra, requirements in project["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, files in sorted(third_party_imports().items()):
        names = {normalized(d) for d in distributions.get(module, [])}
        assert names, f"{module} (imported by {', '.join(sorted(files))}) is not installed: which distribution is it?"
        if module in EXTRAS or module in APART:
            # imported in one place (commands/extras.py), where a missing one is one line naming the extra
            assert files == {"commands/extras.py"}, f"{module} is imported by {', '.join(sorted(files))}: use commands.extras"
            assert not names & required
            assert module in APART or names & extras[EXTRAS[module]]
        elif not names & required:
            undeclared.append(f"{module} (imported by {', '.join(sorted(files))})")
    assert not undeclared, "not in [project.dependencies]: " + ", ".join(undeclared)
    # the README's install (.[dev]) brings every extra
    (itself,) = [r for r in project["optional-dependencies"]["dev"] if r.startswith("lipschitz-lightning[")]
    assert set(EXTRAS.values()) <= set(itself.removeprefix("lipschitz-lightning[").removesuffix("]").split(","))


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from lipschitz_lightning.commands.sample import Tokenizer

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: its import raises ImportError
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ConfigError) as plots:
        pyplot()
    assert one_line(plots.value) == 'error: plots need matplotlib: pip install "lipschitz-lightning[plots]"'
    with pytest.raises(ConfigError) as nanogpt:
        Tokenizer("gpt2")
    assert one_line(nanogpt.value) == (
        "error: ckpt_path's model reads gpt2 tokens: sampling it needs tiktoken: pip install \"lipschitz-lightning[nanogpt]\"")


def test_torchattacks_without_what_it_imports_names_the_extra_that_brings_it(monkeypatch):
    """torchattacks installed with --no-deps but scipy missing: the line names the attacks extra, not a
    reinstall of torchattacks."""
    from lipschitz_lightning.commands.extras import needs

    for name in [name for name in sys.modules if name.split(".")[0] in ("torchattacks", "scipy")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ConfigError) as missing:
        needs("torchattacks", "AutoAttack needs torchattacks")
    assert one_line(missing.value) == 'error: AutoAttack needs torchattacks: pip install "lipschitz-lightning[attacks]"'


def test_the_report_without_matplotlib_exits_with_the_one_line(tmp_path, monkeypatch, capsys):
    from lipschitz_lightning import report

    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text(
        "optimizer: {_target_: lipschitz_lightning.optim.Muon, lr: 0.2, weight_decay: 0.0}\n"
        "constraint: {method: spectral_soft_cap, w_max: 2.0}\n"
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys, "argv", ["lipschitz-report", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        report.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err == 'error: plots need matplotlib: pip install "lipschitz-lightning[plots]"\n'
    assert not list(tmp_path.glob("tradeoff.*"))  # checked before anything is written


# ----------------------------------------------------------------------------- installed, outside the checkout


@pytest.mark.slow
def test_an_installed_package_trains_outside_the_checkout(shared_data_dir, tmp_path):
    """``pip install --no-deps`` of the checkout into a folder (the dependencies are this interpreter's),
    then the commands from a folder outside the checkout: the installed copy is what runs, with its
    own conf/ and sweeps/."""
    source, target, elsewhere = tmp_path / "source", tmp_path / "installed", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in SOURCES:  # a copy: pip's in-tree build would leave build/ and *.egg-info in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    assert (target / "lipschitz_lightning" / "conf" / "train.yaml").is_file()
    assert (target / "lipschitz_lightning" / "sweeps" / "sweep" / "smoke.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "LIPSCHITZ_DATA_DIR": str(shared_data_dir)}

    def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
        return result

    where = run(sys.executable, "-c", "import json, lipschitz_lightning as p; print(json.dumps([p.__file__, str(p.CONF_DIR), str(p.SWEEPS_DIR)]))")
    module, conf, sweeps = map(Path, json.loads(where.stdout))
    assert module == target / "lipschitz_lightning" / "__init__.py"
    assert (conf, sweeps) == (target / "lipschitz_lightning" / "conf", target / "lipschitz_lightning" / "sweeps")

    # the sweeps folder is on the search path: +sweep=smoke composes, through the console script
    smoke = run(str(target / "bin" / "lipschitz-train"), "+sweep=smoke", "--cfg", "job")
    assert yaml.safe_load(smoke.stdout)["task_name"] == "smoke"
    for command in ("evaluate", "certify", "sample"):  # their usage is read from CONF_DIR/<command>.yaml
        assert run(str(target / "bin" / f"lipschitz-{command}"), "--help").stdout.strip()

    log_dir = tmp_path / "logs"
    run(sys.executable, "-m", "lipschitz_lightning.train", "trainer.max_steps=5", "trainer.val_check_interval=5",
        f"paths.log_dir={log_dir}", timeout=600)
    (summary_path,) = log_dir.glob("train/runs/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["step"] == 5
    hydra = yaml.safe_load((summary_path.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {source["provider"]: source["path"] for source in hydra["runtime"]["config_sources"]}
    assert sources["main"] == str(conf) and sources["hydra.searchpath in main"] == str(sweeps)
    assert not list(elsewhere.iterdir())  # nothing written into the working directory
