"""Imports only go down the layers: the model core, then the data and results helpers, then checkpoint
I/O and conversion, then training, then evaluation and benchmarks. Function-local imports count too."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"gptoss_mla_jax": 0, "support": 1, "weights": 2, "train": 3, "eval": 4}
# Command-line entry points that keep their historic module names inside a lower package: they sit on top.
ENTRY_POINTS = {"gptoss_mla_jax/generate.py"}


def imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_no_upward_imports():
    upward = []
    for package, layer in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in ENTRY_POINTS:
                continue
            for line, module in imports(path):
                target = LAYERS.get(module.split(".")[0])
                if target is not None and target > layer:
                    upward.append(f"{name}:{line} imports {module}")
    assert not upward, "\n".join(upward)


def test_every_package_is_in_a_layer():
    """A new top-level package must be placed in LAYERS, or the check above would skip it."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LAYERS), packages - set(LAYERS)
