"""The shape of lib/, read with ast: no import circle, no stage importing a later stage, short functions.

Stages run in this order: data < model < train < evaluate < plots < merge < chat / export / summary; a stage
may import an earlier one, never a later one. Shared modules (configuration, paths, run folders,
errors, tokenization, model loading and generation, ...) may be imported by any stage. Every
import inside the package counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "lib"
STAGES = {"data": 0, "formats": 0, "fields": 0, "model": 1, "train": 2, "trainer": 2, "checkpoints": 2, "evaluate": 3,
          "plots": 4, "merge": 5, "chat": 6, "export": 6, "summary": 6, "push": 6}  # summary: the before/after report that ends the pipeline
SHARED = {"config", "paths", "rundir", "stages", "errors", "tokenization", "tiny", "realmodel", "loading", "figures",
          "generation", "memory", "notebook", "attention", "scoring", "readers", "trainer_args", "oom",
          "modelcard"}  # modelcard: the README.md of the adapter (train) and of the pushed repository (push)
MAX_FUNCTION_LINES = 60



def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(LIB.glob("*.py"))}


def internal_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The lib modules `name` imports: `from .x import y`, `from . import x`, `from lib.x import y`,
    `import lib.x`, at any level of the module (top, function, class)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or (node.level == 0 and (mod == "lib" or mod.startswith("lib."))):
                mod = mod.removeprefix("lib").lstrip(".") if node.level == 0 else mod
                if mod:
                    out.add(mod.split(".")[0])
                else:  # from . import x, y
                    out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lib.")}
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: internal_imports(name, tree, set(trees)) for name, tree in trees.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary import circle, each reported once (starting at its smallest module name)."""
    found = []

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_graph_sees_imports_at_any_level():
    tree = ast.parse("from .config import x\ndef f():\n    from .merge import y\n    import lib.chat\n"
                     "from . import paths\nfrom lib.data import z\nimport torch\n")
    assert internal_imports("m", tree, {"config", "merge", "chat", "paths", "data"}) == {
        "config", "merge", "chat", "paths", "data"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle_in_lib():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_stage_imports_a_later_stage():
    graph = import_graph()
    unknown = sorted(set(graph) - set(STAGES) - SHARED - {"__init__", "__main__"})
    bad = [f"{m} imports {d}" for m, deps in graph.items() if m in STAGES
           for d in deps if d in STAGES and STAGES[d] > STAGES[m]]
    assert not bad, "; ".join(sorted(bad))
    assert not unknown, f"modules with no place in the stage order (add to STAGES or SHARED): {unknown}"


def test_every_function_in_lib_is_short():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"lib/{name}.py:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"{len(long)} functions of {MAX_FUNCTION_LINES} lines or more: " + ", ".join(long)
