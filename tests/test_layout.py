"""The package's layout stays readable: no import cycle, no file past 400 lines, nothing outside the layers.

The layers themselves (which package may import which) are import-linter's contract in ``pyproject.toml``, checked by
``lint-imports`` in CI; these are the rules a layers contract does not state.
"""

import sys

import grimp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from tests.helpers import REPO

MAX_LINES = 400


def test_no_module_imports_a_module_that_imports_it_back():
    """For every import ``m -> x`` inside the package, no chain leads from ``x`` back to ``m``. Catches: a cycle
    like the former ``cli`` <-> ``pipeline`` (the pipeline's warm stages defaulting to ``cli.main``), even one that
    runs through a lazy import inside a function, which grimp counts as an import too."""
    graph = grimp.build_graph("lightning_rlhf")
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                cycles.append(" -> ".join((module, *chain)))
    assert cycles == []


@pytest.mark.parametrize("folder", ["lightning_rlhf", "scripts"])
def test_no_file_is_longer_than_one_sitting(folder):
    """Every Python file of the package and the scripts holds at most 400 lines. Catches: a file that grows past
    what a reader takes in at once (the former 980-line pipeline, 960-line benchmark, 700-line PPO module)."""
    long = {
        str(path.relative_to(REPO)): n
        for path in sorted((REPO / folder).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_top_level_holds_the_layers_and_nothing_else():
    """Every module or package directly under ``lightning_rlhf/`` is one of the layers of the import-linter contract
    (``pyproject.toml``), and every folder is a package (an empty folder would be a namespace package that imports as
    anything). Catches: a new module dropped at the top level, outside every layer, where ``lint-imports`` does not
    check it; a stale folder left behind by a move."""
    top = REPO / "lightning_rlhf"
    (contract,) = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = {name.strip().removeprefix("lightning_rlhf.") for layer in contract["layers"] for name in layer.split("|")}
    entries = {p.stem for p in top.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert entries - {"__init__", "__main__"} == layers
    assert [
        p.name for p in top.iterdir() if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").is_file()
    ] == []
