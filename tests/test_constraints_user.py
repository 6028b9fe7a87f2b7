"""A constraint of the user's own (docs/constraints.md, "Adding a constraint") is found wherever a
user would put it: its module in the working folder, or beside the yaml files of the config folder
named by ``hydra.searchpath`` (``config.compose.user_code_on_path``, which the train command calls first); a
module that is nowhere is one line naming ``constraint._target_`` and what to do. Composed and
checked only, nothing trained (tests/test_constraints.py trains with one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_constraints import TOY_CONSTRAINT
from lipschitz_lightning.config.compose import check_composition, user_code_on_path
from lipschitz_lightning.config.settings import validate_config
from lipschitz_lightning.errors import ConfigError

# docs/constraints.md's class, as the other tests of a user's constraint write it (there: ToyClip)
USER_CONSTRAINT = TOY_CONSTRAINT.replace("ToyClip", "SpectralClip")


@pytest.fixture
def user_folder(tmp_path, monkeypatch, request):
    """``tmp_path/my_conf/constraint/<name>.yaml`` naming ``<module>.SpectralClip`` (a module name of
    this test's own, so that no test sees another's); ``sys.path`` and ``sys.modules`` restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = f"user_clip_{request.node.name.split('[')[0][-24:]}"
    (tmp_path / "my_conf" / "constraint").mkdir(parents=True)
    (tmp_path / "my_conf" / "constraint" / "spectral_clip.yaml").write_text(f"_target_: {module}.SpectralClip\nw_max: 6.0\n")
    yield tmp_path, module
    sys.modules.pop(module, None)


def composed_and_checked(args: list[str]):
    """The train command's order (lipschitz_lightning/train.py): the user's folders on the path, the
    config composed, every setting checked (which imports each target's module)."""
    user_code_on_path(args)
    cfg = check_composition("train", args)
    validate_config(cfg)
    return cfg


def test_a_module_beside_the_search_path_s_yaml_files_is_found(user_folder, monkeypatch):
    folder, module = user_folder
    (folder / "my_conf" / f"{module}.py").write_text(USER_CONSTRAINT)
    monkeypatch.chdir(folder.parent)  # not the folder of the module, nor the checkout
    cfg = composed_and_checked([f"hydra.searchpath=[file://{folder / 'my_conf'}]", "constraint=spectral_clip",
                                f"paths.output_dir={folder / 'run'}"])
    assert cfg.constraint._target_ == f"{module}.SpectralClip"
    assert sys.modules[module].__file__ == str(folder / "my_conf" / f"{module}.py")
    assert not (folder / "run").exists()


def test_a_module_in_the_working_folder_is_found_as_python_m_finds_it(user_folder, monkeypatch):
    folder, module = user_folder
    (folder / f"{module}.py").write_text(USER_CONSTRAINT)
    monkeypatch.chdir(folder)
    # a relative search path, read from the working folder as Hydra reads it
    composed_and_checked(["hydra.searchpath=[file://my_conf]", "constraint=spectral_clip", f"paths.output_dir={folder / 'run'}"])
    assert sys.modules[module].__file__ == str(folder / f"{module}.py")


def test_the_train_command_itself_puts_the_user_s_folders_on_the_path(user_folder, monkeypatch, capsys):
    # through lipschitz_lightning.train.run (train.py, lipschitz-train): a key the user's class does not
    # take is refused naming its settings, which needs the class imported; nothing is built
    from lipschitz_lightning.train import run

    folder, module = user_folder
    (folder / "my_conf" / f"{module}.py").write_text(USER_CONSTRAINT)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # run() sets it when unset
    with pytest.raises(SystemExit) as exit_status:
        run([f"hydra.searchpath=[file://{folder / 'my_conf'}]", "constraint=spectral_clip", "+constraint.strength=2",
             f"paths.output_dir={folder / 'run'}"])
    assert exit_status.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: constraint.strength is not a setting of constraint=spectral_clip; allowed: w_max")
    assert "\n" not in message and not (folder / "run").exists()


def test_a_module_that_is_nowhere_is_one_line_naming_the_key_and_what_to_do(user_folder, monkeypatch):
    folder, module = user_folder
    monkeypatch.chdir(folder)
    with pytest.raises(ConfigError) as error:
        composed_and_checked([f"hydra.searchpath=[file://{folder / 'my_conf'}]", "constraint=spectral_clip",
                              f"paths.output_dir={folder / 'run'}"])
    message = str(error.value)
    assert message.startswith(f"constraint._target_ {module}.SpectralClip cannot be imported: no module {module} ")
    assert f"put {module}.py in one of those folders" in message and "\n" not in message


def test_an_import_error_inside_the_user_s_module_is_one_line_with_its_cause(user_folder, monkeypatch):
    folder, module = user_folder
    (folder / "my_conf" / f"{module}.py").write_text("import a_package_nobody_installed\n")
    monkeypatch.chdir(folder)
    with pytest.raises(ConfigError) as error:
        composed_and_checked([f"hydra.searchpath=[file://{folder / 'my_conf'}]", "constraint=spectral_clip",
                              f"paths.output_dir={folder / 'run'}"])
    assert str(error.value) == (f"constraint._target_ {module}.SpectralClip cannot be imported: "
                                "ModuleNotFoundError: No module named 'a_package_nobody_installed'")


def test_only_existing_folders_go_on_the_path_once_and_last(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf_a").mkdir()
    before = list(sys.path)
    added = user_code_on_path(["hydra.searchpath=[file://conf_a,file://missing,pkg://somewhere]", "seed=1"])
    assert added == [str(tmp_path.resolve()), str((tmp_path / "conf_a").resolve())]
    assert sys.path == before + added  # after everything installed: a user's module shadows nothing
    assert user_code_on_path(["hydra.searchpath=[file://conf_a]"]) == []
