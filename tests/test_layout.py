"""The architecture as the import graph: each layer imports only the layers below it, and the README lists every
module of the packages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

# bottom to top; a module may import from its own layer and the ones before it
LAYERS = [
    "llm.errors",  # the error root
    "llm.core",  # the model library: config, model, FLOPs, schedule, sampling, memory estimate (torch only)
    "llm.runtime",  # where it runs: topology, hardware, launching
    "datamodules",  # the data pipeline
    "llm.training",  # Lightning glue: modules, optimizer set-up, parallelism, checkpoint, plots
    "callbacks",  # Lightning callbacks
    "llm.app",  # assembles a run from the config
    "llm",  # the commands: python -m llm.<name>
]
PACKAGES = ("llm", "datamodules", "callbacks")


def layer_of(module: str) -> str:
    for layer in sorted(LAYERS, key=len, reverse=True):  # most specific first: llm.core before llm
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(module)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from llm import plan` imports the module llm.plan
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    own = {n for n in names if n.split(".")[0] in PACKAGES}
    known = modules()
    # `from llm.app.spec import resolve` names a function: keep its module
    return {n if n in known else n.rpartition(".")[0] for n in own}


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_run_one_way(module):
    here = LAYERS.index(layer_of(module))
    upward = sorted(n for n in imports_of(modules()[module]) if LAYERS.index(layer_of(n)) > here)
    assert not upward, f"{module} ({LAYERS[here]}) imports from a layer above it: {upward}"


def test_layer_order_is_the_one_documented():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    paths = [layer.replace(".", "/") for layer in LAYERS if layer != "llm"]
    positions = [re.search(rf"^{path}(/|\.py)", section, re.M).start() for path in paths]
    assert positions == sorted(positions), "README's layout lists the layers bottom to top"


def test_readme_lists_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"\b([a-z_]+\.py)\b", section))
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in modules().values()
        if path.name != "__init__.py" and path.name not in listed
    )
    assert not missing, f"README's layout section does not list {missing}"


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 500}
    assert not big, f"modules over 500 lines: {big}"
