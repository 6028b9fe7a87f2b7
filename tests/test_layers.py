"""The package's layers, as its folders show them: no import runs from a lower layer up to a higher
one, and the ground floor (the maths) imports neither Lightning nor Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lipschitz_lightning"

# lowest first; a module may import its own layer and the ones below
LAYERS = {
    "errors": 0, "__init__": 0,
    "core": 1,
    "models": 2, "optim": 2, "data": 2, "robustness": 2,
    # one training step's pieces (step.py), run by the Lightning module and the benchmark's plain loop
    "step": 3, "lit": 3,
    # the settings: composing conf/ and checking it, for every command and for training
    "config": 3,
    "commands": 4,
    # the documented entry points kept at the top: `python -m lipschitz_lightning.<command>` and the
    # Python API (lipschitz_lightning.constraints, lipschitz_lightning.lipschitz)
    "constraints": 5, "lipschitz": 5, "train": 5, "evaluate": 5, "certify": 5, "sample": 5, "benchmark": 5, "report": 5, "quantize": 5,
}
PURE = ("core", "robustness", "step.py")  # torch only


def layer(parts: tuple[str, ...]) -> int:
    return LAYERS[parts[0].removesuffix(".py")]


def lazy_exports(tree: ast.Module) -> set[ast.AST]:
    """The nodes of a module-level ``__getattr__``: the package's lazy exports (``from lipschitz_lightning
    import WeightConstraint``) belong to the documented API at the top, not to the package's layer 0."""
    return {node for function in tree.body if isinstance(function, ast.FunctionDef) and function.name == "__getattr__"
            for node in ast.walk(function)}


def imports(path: Path) -> list[tuple[str, int]]:
    found = []
    tree = ast.parse(path.read_text())
    lazy = lazy_exports(tree) if path == PACKAGE / "__init__.py" else set()
    for node in ast.walk(tree):
        if node in lazy:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            if node.module == "lipschitz_lightning":
                found += [(f"lipschitz_lightning.{alias.name}", node.lineno) for alias in node.names]
    return found


def test_every_module_has_a_layer_and_imports_only_downwards():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        own = layer(parts)
        for name, line in imports(path):
            if not name.startswith("lipschitz_lightning."):
                continue
            target = name.split(".")[1]
            if target in LAYERS and LAYERS[target] > own:
                offences.append(f"{path.relative_to(PACKAGE)}:{line} imports {name} (layer {LAYERS[target]} > {own})")
    assert not offences, "\n".join(offences)


def test_the_ground_floor_imports_neither_lightning_nor_hydra():
    offences = []
    for folder in PURE:
        for path in sorted((PACKAGE / folder).rglob("*.py")) if (PACKAGE / folder).is_dir() else [PACKAGE / folder]:
            for name, line in imports(path):
                if name.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf"):
                    offences.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not offences, "\n".join(offences)


def test_what_runs_before_torch_imports_none():
    # the settings' types (a radius among them) and the benchmark's argument parsing come before torch:
    # a mistyped setting or flag costs no torch import
    import subprocess
    import sys

    code = ("import sys\n"
            "import lipschitz_lightning.core.types, lipschitz_lightning.config.tradeoff, lipschitz_lightning.commands.report\n"
            "import lipschitz_lightning.config.settings, lipschitz_lightning.config.compose, lipschitz_lightning.train\n"
            "from lipschitz_lightning.commands.benchmark import read_arguments\n"
            "read_arguments(['--steps', '20'])\n"
            "loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'lightning'))\n"
            "assert not loaded, loaded[:5]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
