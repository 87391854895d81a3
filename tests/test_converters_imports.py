"""The import structure of pabnn.converters, read from the source with `ast`: no module imports
itself through others, and the ONNX op modules import only the converter registry
(converters/onnx_registry.py) from the package, which imports nothing from it.

Imports inside functions count like those at the top of a module: a cycle through either makes
what works depend on which module is imported first.
"""
import ast
from pathlib import Path

import pytest

import pabnn.converters

PACKAGE = "pabnn.converters"
DIRECTORY = Path(pabnn.converters.__file__).parent
MODULES = sorted(path.stem for path in DIRECTORY.glob("*.py"))
REGISTRY = "onnx_registry"
# Modules whose functions the importer (onnx_import.py) calls on ONNX nodes or models.
OP_MODULES = sorted({path.stem for path in DIRECTORY.glob("onnx_ops*.py")} |
                    {"onnx_shape_folding", "dynamic_weights", "onnx_opset_upgrade"})
REGISTERING_NAMES = {"onnx_converter", "integer_input_converter"}


def _tree(module):
    path = DIRECTORY / f"{module}.py"
    return ast.parse(path.read_text(), filename=str(path))


def _imports(module):
    """{module of pabnn.converters: first line importing it} for every import anywhere in `module`
    ("__init__" stands for the package itself)."""
    found = {}
    for node in ast.walk(_tree(module)):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.level == 0 and node.module and (node.module + ".").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            if base:  # from .x import name, from pabnn.converters.x import name
                targets = [base.split(".")[0]]
            else:  # from . import x: a submodule, or a name the package's __init__ defines
                targets = [alias.name if alias.name in MODULES else "__init__" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [(alias.name[len(PACKAGE) + 1:].split(".")[0] or "__init__") for alias in node.names
                       if (alias.name + ".").startswith(PACKAGE + ".")]
        for target in targets:
            found.setdefault(target, node.lineno)
    return found


def _cycle(graph):
    """One import cycle in `graph` ({module: {module it imports: line}}) as a list of modules, or None."""
    state = {}  # module -> "open" while its imports are explored, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_module_lists_are_the_package():
    assert REGISTRY in MODULES, f"expected the converter registry {REGISTRY}.py in {DIRECTORY}"
    assert "onnx_ops" in OP_MODULES and set(OP_MODULES) <= set(MODULES), f"found {OP_MODULES} in {MODULES}"


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": 1}, "b": {"b": 1}}) == ["b", "b"]
    assert _cycle({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}) is None


def test_no_import_cycles_in_converters():
    graph = {module: _imports(module) for module in MODULES}
    cycle = _cycle(graph)
    if cycle:
        steps = ", ".join(f"{a}.py line {graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
        pytest.fail(f"import cycle in {PACKAGE}: {' -> '.join(cycle)} ({steps})")


@pytest.mark.parametrize("module", [REGISTRY] + OP_MODULES)
def test_op_modules_import_only_the_registry(module):
    allowed = set() if module == REGISTRY else {REGISTRY}
    others = {target: line for target, line in _imports(module).items() if target not in allowed}
    assert not others, (f"{module}.py imports {', '.join(f'{t} (line {n})' for t, n in sorted(others.items()))} from "
                        f"{PACKAGE}; expected {'nothing' if not allowed else 'only ' + REGISTRY}")


def test_every_module_that_registers_converters_is_an_op_module():
    registering = sorted(module for module in MODULES if module != REGISTRY and any(
        isinstance(node, ast.Name) and node.id in REGISTERING_NAMES for node in ast.walk(_tree(module))))
    assert registering, f"expected modules using {sorted(REGISTERING_NAMES)}"
    assert set(registering) <= set(OP_MODULES), f"{sorted(set(registering) - set(OP_MODULES))} register converters"
