"""The shape of lib/, read with ast: folders layered down the pipeline, no import circle, no stage
importing a later stage, short functions and modules.

lib/ has a folder per stage of the pipeline over a shared core, in this order:
run (the core) < data (01) < model (02) < train (03) < evaluate (04, 05) < ship (06); a folder may import
itself and the folders before it, never a later one. Inside the folders, stage modules keep the finer
order of the stages (evaluation < plots < merge < chat / export / push / summary / compare). The two
faces, lib/notebook.py and lib/__main__.py, sit on top. Every import inside the package counts, also one
inside a function. A module's name here is its path under lib/ with dots: "data.readers", "notebook".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "lib"
FOLDERS = ("run", "data", "model", "train", "evaluate", "ship")  # the pipeline's order: each imports only those before it
TOP = {"__init__", "__main__", "notebook"}  # the package and its two faces: may import any folder
STAGES = {"data.prepare": 0, "model.configure": 1, "train.training": 2, "evaluate.evaluation": 3,
          "evaluate.forgetting": 3, "evaluate.plots": 4, "ship.merge": 5, "ship.chat": 6, "ship.export": 6,
          "ship.push": 6, "evaluate.summary": 6,
          "evaluate.compare": 6}  # summary and compare read every stage's results: they come last
MAX_FUNCTION_LINES = 60


def folder_of(name: str) -> str | None:
    """The folder of module `name` ("data.readers" -> "data"; a folder's "data.__init__" -> "data"), None on top."""
    return name.split(".")[0] if "." in name else None


def modules() -> dict[str, ast.Module]:
    """Every module of lib/, by its dotted name under lib/ (a folder's __init__ as "folder.__init__")."""
    return {".".join(p.relative_to(LIB).with_suffix("").parts): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
            for p in sorted(LIB.rglob("*.py"))}


def _resolve(name: str, node: ast.ImportFrom) -> list[str]:
    """The dotted module paths under lib/ that `from ... import ...` in module `name` names (before
    checking which exist): `from .x import y` (relative to the module's folder), `from lib.a.b import c`,
    `from lib.a import b` (b may be a module of folder a)."""
    mod = node.module or ""
    if node.level:
        base = name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        parts = base + (mod.split(".") if mod else [])
    elif mod == "lib" or mod.startswith("lib."):
        parts = mod.split(".")[1:]
    else:
        return []
    prefix = ".".join(parts)
    out = [prefix] if prefix else []
    out += [f"{prefix}.{a.name}" if prefix else a.name for a in node.names]
    return out


def internal_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The lib modules `name` imports: `from .x import y`, `from lib.a.x import y`, `from lib.a import x`,
    `import lib.a.x`, at any level of the module (top, function, class). Importing a folder (`from lib.data
    import run_prepare`) counts as importing its `__init__`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out |= set(_resolve(name, node))
        elif isinstance(node, ast.Import):
            out |= {a.name[4:] for a in node.names if a.name.startswith("lib.")}
    found = set()
    for m in out:
        if m in known:
            found.add(m)
        elif f"{m}.__init__" in known:
            found.add(f"{m}.__init__")
    return {m for m in found if m != name}


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


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a later folder by an earlier one ("run.config imports data.readers")."""
    bad = []
    for m, deps in graph.items():
        fm = folder_of(m)
        if fm is None:
            continue
        for d in deps:
            fd = folder_of(d)
            if fd is not None and FOLDERS.index(fd) > FOLDERS.index(fm):
                bad.append(f"{m} imports {d}")
    return sorted(bad)


def test_the_graph_sees_imports_at_any_level():
    tree = ast.parse("from .config import x\ndef f():\n    from lib.ship.merge import y\n    import lib.ship.chat\n"
                     "from . import paths\nfrom lib.data import z\nfrom lib.train import samples\nimport torch\n")
    known = {"run.config", "ship.merge", "ship.chat", "run.paths", "data.__init__", "train.samples", "train.__init__"}
    assert internal_imports("run.m", tree, known) == {
        "run.config", "ship.merge", "ship.chat", "run.paths", "data.__init__", "train.samples", "train.__init__"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_folders_are_the_pipeline():
    """`ls lib/` shows the stages' folders, each a package whose __init__ names its public steps."""
    folders = sorted(p.name for p in LIB.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == sorted(FOLDERS)
    loose = sorted(p.stem for p in LIB.glob("*.py"))
    assert set(loose) == TOP, f"modules outside the folders: {sorted(set(loose) - TOP)}"


def test_the_layering_check_catches_a_later_import():
    """A deliberate import of a later stage's folder, in a copy of one real module, is caught."""
    tree = ast.parse((LIB / "data" / "readers.py").read_text(encoding="utf-8") +
                     "\n\ndef _bad():\n    from lib.train.samples import read_samples\n")
    graph = import_graph()
    graph["data.readers"] = internal_imports("data.readers", tree, set(graph))
    assert layering_violations(graph) == ["data.readers imports train.samples"]
    graph["run.paths"] = graph["run.paths"] | {"ship.__init__"}
    assert "run.paths imports ship.__init__" in layering_violations(graph)


def test_each_folder_imports_only_itself_and_the_folders_before_it():
    bad = layering_violations(import_graph())
    assert not bad, "imports of a later stage's folder: " + "; ".join(bad)


def test_each_folder_init_names_and_exposes_its_public_steps():
    """Each folder's __init__ says what the stage does and which functions are its public steps, and
    exposes exactly those (its __all__), each defined in a module of its own folder (no re-export of
    another folder's names, no alias of an old path)."""
    import importlib

    trees = modules()
    for folder in FOLDERS:
        tree = trees[f"{folder}.__init__"]
        doc = ast.get_docstring(tree) or ""
        package = importlib.import_module(f"lib.{folder}")
        public = list(package.__all__)
        assert public, f"lib/{folder}/__init__.py exposes no public step"
        for name in public:
            assert name in doc, f"lib/{folder}/__init__.py: {name} is exposed but its docstring does not name it"
            obj = getattr(package, name)
            assert obj.__module__.startswith(f"lib.{folder}."), f"lib.{folder}.{name} comes from {obj.__module__}"
        imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert imported == set(public), f"lib/{folder}/__init__.py imports {sorted(imported - set(public))} beyond __all__"


def _path(name: str) -> str:
    return name.replace(".", "/") + ".py"


def test_no_import_circle_in_lib():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_stage_imports_a_later_stage():
    graph = import_graph()
    bad = [f"{m} imports {d}" for m, deps in graph.items() if m in STAGES
           for d in deps if d in STAGES and STAGES[d] > STAGES[m]]
    assert not bad, "; ".join(sorted(bad))
    assert set(STAGES) <= set(graph), f"stage modules that no longer exist: {sorted(set(STAGES) - set(graph))}"


def test_every_function_in_lib_is_short():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"lib/{_path(name)}:{node.lineno} {node.name} ({n} lines)")
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
    found = [f"lib/{_path(name)}:{line}: {_NOTEBOOK_NAME.search(text).group()}"
             for name, tree in modules().items() if name != "run.stages"
             for line, text in _code_strings(tree) if _NOTEBOOK_NAME.search(text)]
    assert not found, "notebook names outside lib/run/stages.py (use stage(NAME).notebook / .rerun / .first): " + \
        ", ".join(found)


def test_the_registry_declares_every_file_of_the_run_layout():
    from lib.run.paths import RunPaths
    from lib.run.stages import SHARED_OUTPUTS, STAGES, owner

    root = Path("/run")
    paths = RunPaths(root)
    names = [n for n, v in vars(RunPaths).items() if isinstance(v, property) and n not in ("root", "lock")]
    undeclared = []
    for n in names:
        rel = str(getattr(paths, n).relative_to(root))
        inside = [out for s in STAGES for out in s.outputs if out.startswith(rel + "/")]  # a folder of several
        if owner(rel) is None and rel not in SHARED_OUTPUTS and not inside and rel not in ("logs", "data"):
            undeclared.append(f"{n} ({rel})")
    assert not undeclared, f"RunPaths entries no stage declares in lib/run/stages.py: {undeclared}"
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
    from lib.run.paths import run_paths
    from lib.run.stages import SHARED_OUTPUTS, owner

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
    long = {f"lib/{p.relative_to(LIB)}": n for p in sorted(LIB.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_module_opens_with_its_job():
    missing = [f"lib/{_path(name)}" for name, tree in modules().items() if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring saying their one job: {missing}"


def test_classes_live_at_module_level():
    nested = [f"lib/{_path(name)}:{inner.lineno} {inner.name}" for name, tree in modules().items()
              for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for inner in ast.walk(node) if isinstance(inner, ast.ClassDef)]
    assert not nested, f"classes defined inside functions (define them at module level): {nested}"
