"""The house's shape, checked: imports run one way, only cli.py and display.py import typer or rich, and
no module or function outgrows the sizes the house keeps (~300 lines a module, ~50 a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simclr_cli"
# Each module may import only modules before it: config -> data -> augment -> model -> loss -> optim, with
# the run directory, checkpoints, evaluation, probe, embed and the CLI hanging off the side after them.
LAYERS = ["__init__", "errors", "runtime", "files", "typed", "config", "images", "cache", "cifar", "data", "readahead", "colour", "augment", "model",
          "loss", "optim", "interrupt", "methods.ema", "methods.simclr", "methods.moco", "methods.byol", "methods", "checkpoint", "encoder_file", "features",
          "evaluate", "rundir", "readback", "resume", "train", "launch", "probe", "vectors", "embed", "plots", "neighbors", "report", "display", "cli_options", "cli_pictures", "cli",
          "__main__"]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 50


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__") if name != "__init__" else name] = path
    return found


def project_imports(path: Path) -> set[str]:
    """simclr_cli modules imported anywhere in the file (function-level imports too), except under
    TYPE_CHECKING, which never runs."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simclr_cli"):
            base = node.module.removeprefix("simclr_cli").lstrip(".")
            names |= {f"{base}.{a.name}".lstrip(".") for a in node.names} | {base or "__init__"}
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("simclr_cli.") for a in node.names if a.name.startswith("simclr_cli.")}
    return {n for n in names if n in modules()}


def test_every_module_has_a_layer():
    assert sorted(modules()) == sorted(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_imports_run_one_way(name):
    later = [m for m in project_imports(modules()[name]) if LAYERS.index(m) > LAYERS.index(name)]
    assert not later, f"{name} imports {later}, which come after it"


@pytest.mark.parametrize("name", LAYERS)
def test_only_the_cli_speaks_rich_and_typer(name):
    tree = ast.parse(modules()[name].read_text())
    used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert name in ("cli", "cli_options", "cli_pictures", "display") or not used & {"typer", "rich"}


@pytest.mark.parametrize("name", LAYERS)
def test_sizes(name):
    """A module may pass the line cap where one concept is whole in it, saying so in its docstring."""
    source = modules()[name].read_text()
    whole = "Longer than 300 lines:" in (ast.get_docstring(ast.parse(source)) or "")
    assert len(source.splitlines()) <= MAX_MODULE_LINES or whole
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long
