"""Layering, read from the source: no module imports a layer above its own, and no import cycles.

Layers, lowest first (a module may import its own package and any lower layer):

    errors, interrupts, cuda_ext  <  registry, data, storage, kernels, devices  <  gaussians, losses
    <  render, config  <  scene, priors, prepare  <  dsm  <  synth, eval, export  <  train  <  city  <  cli  <  __main__

So the core (data .. scene) never sees the shell's config, export and eval sit beside train and
never import it, city runs many tiles' training and export, and the CLI is the only module that sees everything. Every import counts, also the
lazy ones inside functions: they run too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "skyfall"

LAYERS: list[set[str]] = [
    {"errors", "interrupts", "cuda_ext", "skyfall"},
    {"registry", "data", "storage", "kernels", "devices"},
    {"gaussians", "losses"},
    {"render", "config"},
    {"scene", "priors", "prepare"},
    {"dsm"},
    {"synth", "eval", "export"},
    {"train"},
    {"city"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from pkg import mod`` counts as pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "skyfall"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "skyfall":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "skyfall"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p, modules) if i in modules and i != m} for m, p in modules.items()}


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(RANK), f"give these a layer in LAYERS: {sorted(units - set(RANK))}"


def test_no_module_imports_a_layer_above_it():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _unit(mod), _unit(dep)
            if a != b and b != "skyfall" and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "source", ["skyfall.train.stage1 -> skyfall.cli.train", "skyfall.data.tile -> skyfall.scene"]
)
def test_the_check_catches_an_upward_import(source: str):
    mod, dep = source.split(" -> ")
    assert RANK[_unit(dep)] > RANK[_unit(mod)]
