"""The shape of lib/, read with ast: no import circle, no stage importing a later stage, short functions.

Stages run in this order: data < model < train < evaluate < plots < merge < chat / export / summary; a stage
may import an earlier one, never a later one. Shared modules (configuration, paths, run folders,
errors, tokenization, model loading and generation, ...) may be imported by any stage. Every
import inside the package counts, also one inside a function.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
STAGES = {"data": 0, "formats": 0, "turns": 0, "fields": 0, "examples": 0, "audit": 0, "model": 1, "train": 2,
          "trainer": 2, "lmhead": 2, "progress": 2, "checkpoints": 2, "samples": 2, "evaluate": 3, "forgetting": 3, "plots": 4,
          "merge": 5, "chat": 6, "export": 6, "llamacpp": 6, "ollama": 6, "parity": 6, "summary": 6, "push": 6,
          "compare": 6}  # summary: the before/after report that ends the pipeline
SHARED = {"config", "settings", "hardware", "templates", "toolcalls", "textmetrics", "prompts", "context", "paths",
          "rundir", "stages", "errors", "tokenization", "tiny",
          "realmodel", "loading", "figures", "generation", "memory", "notebook", "attention", "scoring", "readers",
          "trainer_args", "oom",
          "formatting", "modelcard"}  # modelcard: the README.md of the adapter (train) and of the pushed repository (push)
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


# ----------------------------------------------------------------------------- the stage registry

_NOTEBOOK_NAME = re.compile(r"\b0[1-6]_[a-z]+(?:_[a-z]+)*\b")


def _code_strings(tree: ast.Module):
    """The string literals of a module that are not docstrings (f-string parts included)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_notebook_names_are_spelled_only_in_the_stage_registry():
    found = [f"lib/{name}.py:{line}: {_NOTEBOOK_NAME.search(text).group()}"
             for name, tree in modules().items() if name != "stages"
             for line, text in _code_strings(tree) if _NOTEBOOK_NAME.search(text)]
    assert not found, "notebook names outside lib/stages.py (use stage(NAME).notebook / .rerun / .first): " + \
        ", ".join(found)


def test_the_registry_declares_every_file_of_the_run_layout():
    from lib.paths import RunPaths
    from lib.stages import SHARED_OUTPUTS, STAGES, owner

    root = Path("/run")
    paths = RunPaths(root)
    names = [n for n, v in vars(RunPaths).items() if isinstance(v, property) and n not in ("root", "lock")]
    undeclared = []
    for n in names:
        rel = str(getattr(paths, n).relative_to(root))
        inside = [out for s in STAGES for out in s.outputs if out.startswith(rel + "/")]  # a folder of several
        if owner(rel) is None and rel not in SHARED_OUTPUTS and not inside and rel not in ("logs", "data"):
            undeclared.append(f"{n} ({rel})")
    assert not undeclared, f"RunPaths entries no stage declares in lib/stages.py: {undeclared}"
    assert len({s.name for s in STAGES}) == len(STAGES)
    declared = [out for s in STAGES for out in s.outputs]
    assert len(declared) == len(set(declared)), "two stages declare the same output"


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _changed(before: dict, after: dict) -> set[str]:
    return {p for p, t in after.items() if before.get(p) != t} | (set(before) - set(after))


@pytest.mark.slow
def test_each_stage_writes_only_its_declared_outputs(outputs, capsys):
    """Every stage of the registry run in turn through the CLI on the tiny model: the files each one
    creates, changes or removes are all inside its declared outputs (or the shared config and manifests),
    and the files left in the run directory all belong to a stage."""
    from conftest import SAMPLE

    from lib.__main__ import main
    from lib.paths import run_paths
    from lib.stages import SHARED_OUTPUTS, owner

    quick = ["train.max_steps=2", "train.eval_steps=1", "train.save_steps=1", "train.logging_steps=1",
             "eval.generate_examples=1", "eval.max_examples=4", "merge.fail_on_drift=false", "export.parity_examples=1",
             "export.parity_tokens=4"]
    sets = [a for kv in quick for a in ("--set", kv)]
    commands = [("prepare", ["--data", str(SAMPLE), "--profile", "tiny"] + sets), ("train", []), ("evaluate", []),
                ("plot", []), ("merge", []), ("export", ["--quant", "f16", "--allow-drift"]),
                ("push", ["--repo", "someone/x", "--dry-run"])]
    root = run_paths("layout").root
    before: dict = {}
    for command, extra in commands:
        assert main([command, "--run", "layout"] + extra) == 0, capsys.readouterr().err
        after = _snapshot(root)
        for rel in sorted(_changed(before, after)):
            top = rel.split("/")[0]
            s = owner(rel)
            assert top in SHARED_OUTPUTS or (s is not None and s.command == command), \
                f"`{command}` wrote {rel}, which is {'declared by ' + s.name if s else 'declared by no stage'}"
        before = after
    orphans = [rel for rel in before if owner(rel) is None and rel.split("/")[0] not in SHARED_OUTPUTS]
    assert not orphans, f"files no stage declares: {orphans}"


MAX_MODULE_LINES = 450


def test_every_module_in_lib_is_short():
    """One noun a module: a module past ~450 lines holds several and is split by noun."""
    long = {f"lib/{p.name}": n for p in sorted(LIB.glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_module_opens_with_its_job():
    missing = [f"lib/{name}.py" for name, tree in modules().items() if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring saying their one job: {missing}"


def test_classes_live_at_module_level():
    nested = [f"lib/{name}.py:{inner.lineno} {inner.name}" for name, tree in modules().items()
              for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for inner in ast.walk(node) if isinstance(inner, ast.ClassDef)]
    assert not nested, f"classes defined inside functions (define them at module level): {nested}"
