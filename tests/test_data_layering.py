"""nopejax/data/ imports run one way: no import inside a function, no cycle between modules.

Checked on the source with `ast`, so a lazy import added to dodge a cycle fails here.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nopejax" / "data"
MODULES = {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports_inside_functions(tree: ast.Module) -> list[str]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            found += [f"line {n.lineno} in {getattr(fn, 'name', 'lambda')}()" for n in ast.walk(fn)
                      if isinstance(n, ast.Import | ast.ImportFrom)]  # fmt: skip
    return found


def data_imports(tree: ast.Module) -> set[str]:
    """Sibling modules of nopejax.data imported by a module (`from nopejax.data import x` included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "nopejax.data":
                out |= {a.name if a.name in MODULES else "__init__" for a in node.names}
            elif node.module.startswith("nopejax.data."):
                out.add(node.module.removeprefix("nopejax.data.").split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("nopejax.data.") for a in node.names if a.name.startswith("nopejax.data.")}
    return out


GRAPH = {name: data_imports(tree) for name, tree in MODULES.items()}


def test_no_import_statement_inside_a_function():
    bad = {name: found for name, tree in MODULES.items() if (found := imports_inside_functions(tree))}
    assert not bad, f"imports inside functions: {bad}"


def test_the_detector_sees_a_lazy_import():  # the checks above cannot pass vacuously
    tree = ast.parse("def f():\n    from nopejax.data import pipeline\n")
    assert imports_inside_functions(tree) == ["line 2 in f()"] and data_imports(tree) == {"pipeline"}


def test_no_import_cycle_and_the_layers_run_one_way():
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "open":
            raise AssertionError(f"import cycle: {' -> '.join([*path, name])}")
        if state.get(name) != "done":
            state[name] = "open"
            for dep in sorted(GRAPH[name]):
                visit(dep, [*path, name])
            state[name], _ = "done", order.append(name)

    for name in GRAPH:
        visit(name, [])
    rank = {name: i for i, name in enumerate(order)}  # dependencies first
    # formats and sources below tokenizers, packing below the pipeline, prepare and the CLI on top
    for low, high in [("sources", "tokenizer"), ("tokenizer", "pipeline"), ("packing", "pipeline"),
                      ("pipeline", "prepare"), ("prepare", "commands"), ("commands", "__init__")]:  # fmt: skip
        assert rank[low] < rank[high], order
    assert not any("__init__" in deps for deps in GRAPH.values())  # nothing imports the package facade
