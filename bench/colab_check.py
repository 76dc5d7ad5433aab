"""`make colab-check`: the six notebooks run as Colab runs them, on Colab's own package versions.

    python bench/colab_check.py            # ~10 min the first time (the environment), then ~3-5 min

1. A virtual environment outside the repository (COLAB_CHECK_HOME, default ~/.cache/qlora-colab-check)
   with Colab's versions of the packages it shares with this project (bench/colab-packages.txt, from
   googlecolab/backend-info's pip-freeze.txt) and a CPU build of torch. Colab's is 2.11.0 (+cpu, +cu128 on
   GPU runtimes) from PyTorch's own index, which this machine cannot reach; the CPU build it can get is
   COLAB_CHECK_TORCH (default torch==2.13.0). Colab's Python is 3.13; this one is the Python running this
   script. No trl, no bitsandbytes, no papermill in it: Colab has none of them.
2. The repository (its git-tracked and untracked, not ignored files) at Colab's path,
   /content/qlora-notebooks, and a stand-in `google.colab` imported when the kernel starts (as Colab's is),
   whose `drive.mount` links /content/drive/MyDrive to a local folder. The copied notebooks' setup cells
   set MOUNT_DRIVE = True, so the runs land on the "Drive".
3. The notebooks 01..06 in order with papermill (from this Python; the kernel is the Colab environment's
   python, started in /content as Colab's is), on the tiny profile. The setup cell's Colab branch pip
   installs the project. A notebook whose setup cell says "restart needed" is run again in a new kernel
   (what a user does: restart the session) and the restart is reported.
4. Prints the versions used, what pip changed, whether a restart was needed, `pip check`; fails if a
   torch package changed, `pip check` is not clean, a notebook failed, or the chat widget was not shown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = REPO / "bench" / "colab-packages.txt"
HOME = Path(os.environ.get("COLAB_CHECK_HOME", Path.home() / ".cache" / "qlora-colab-check"))
TORCH = os.environ.get("COLAB_CHECK_TORCH", "torch==2.13.0")
CONTENT = Path("/content")
CLONE = CONTENT / "qlora-notebooks"
NOTEBOOKS = sorted((REPO / "notebooks").glob("0*.ipynb"))
COLAB_PYTHON, COLAB_TORCH = "3.13", "2.11.0"  # googlecolab/backend-info, 2026-08-19

STANDIN = '''"""A stand-in for Colab's google.colab (bench/colab_check.py): drive.mount links a local folder."""
'''
DRIVE = '''"""drive.mount as Colab's: the mount point gets MyDrive/, here a link to COLAB_CHECK_DRIVE."""
import os


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    os.makedirs(mountpoint, exist_ok=True)
    link = os.path.join(mountpoint, "MyDrive")
    if not os.path.islink(link):
        os.symlink(os.environ["COLAB_CHECK_DRIVE"], link)
    print("Mounted at " + mountpoint)
'''


def pip(python: Path, *args: str, capture: bool = False) -> str:
    res = subprocess.run([str(python), "-m", "pip", *args], capture_output=capture, text=True)
    if res.returncode:
        out = (res.stdout or "") + (res.stderr or "") if capture else ""
        raise SystemExit(f"colab-check: pip {' '.join(args[:3])} failed ({res.returncode}) {out[-2000:]}")
    return res.stdout or ""


def freeze(python: Path) -> dict[str, str]:
    out = pip(python, "list", "--format=json", "--disable-pip-version-check", capture=True)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


def colab_env() -> Path:
    """The Colab environment: made once (its package list kept in colab-freeze.json), then put back to exactly
    that list before every check (what the last check's setup cell installed or changed is undone)."""
    venv, saved = HOME / "venv", HOME / "colab-freeze.json"
    python = venv / "bin" / "python"
    if not python.exists():
        HOME.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "install", "-q", "--upgrade", "pip")
    if not saved.exists():
        pip(python, "install", "-q", TORCH)
        pip(python, "install", "-q", "-r", str(PACKAGES))
        saved.write_text(json.dumps(freeze(python), indent=1))
    colab = json.loads(saved.read_text())
    extra = sorted(set(freeze(python)) - set(colab))
    if extra:
        pip(python, "uninstall", "-q", "-y", *extra)
    pins = [f"{n}=={v}" for n, v in colab.items() if n not in ("pip", "setuptools", "wheel")]
    pip(python, "install", "-q", "--no-deps", *pins)  # a no-op when nothing changed
    return python


def copy_repo() -> None:
    """The repository at /content/qlora-notebooks, as `git clone` would give it (untracked files too: the
    working tree is what is checked), with the setup cells' MOUNT_DRIVE = True."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    shutil.rmtree(CLONE, ignore_errors=True)
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (CLONE / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, CLONE / name)
    for nb in (CLONE / "notebooks").glob("0*.ipynb"):
        book = json.loads(nb.read_text())
        setup_cell = book["cells"][1]
        source = "".join(setup_cell["source"])
        assert '.git", False' in source, f"{nb.name}: no MOUNT_DRIVE in its setup cell"
        setup_cell["source"] = source.replace('.git", False', '.git", True')
        nb.write_text(json.dumps(book, indent=1))


def kernel(python: Path, work: Path) -> None:
    """A kernelspec for the Colab environment's python whose kernel imports the google.colab stand-in at start."""
    colab = work / "standin" / "google" / "colab"
    colab.mkdir(parents=True)
    (colab.parent / "__init__.py").write_text("")
    (colab / "__init__.py").write_text(STANDIN)
    (colab / "drive.py").write_text(DRIVE)
    startup = work / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # noqa: F401  (Colab's kernel has it imported)\n")
    spec = work / "jupyter" / "kernels" / "colab"
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": str(work / "standin"), "IPYTHONDIR": str(work / "ipython"), "SFT_PROFILE": "tiny",
           "COLAB_CHECK_DRIVE": str(work / "drive"), "TOKENIZERS_PARALLELISM": "false"}
    (work / "drive").mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab (stand-in)", "language": "python", "env": env}))


def run_notebook(nb: Path, out: Path) -> str | None:
    """Runs one notebook in a new Colab kernel; returns the error line, or None."""
    import papermill as pm

    try:
        pm.execute_notebook(str(nb), str(out), kernel_name="colab", cwd=str(CONTENT), progress_bar=False,
                            request_save_on_cell_execute=False)
    except pm.PapermillExecutionError as e:
        return f"{e.ename}: {e.evalue}".strip().splitlines()[0]
    return None


def run_all(work: Path) -> tuple[list[str], list[str]]:
    """The six notebooks in order; a 'restart needed' is followed by a run in a new kernel. Returns
    (the restarts, the failures)."""
    restarts, failures = [], []
    for nb in NOTEBOOKS:
        out = HOME / "executed" / nb.name  # kept for a look after the check
        out.parent.mkdir(exist_ok=True)
        error = run_notebook(CLONE / "notebooks" / nb.name, out)
        if error and "restart needed" in error:
            restarts.append(f"{nb.name}: {error}")
            error = run_notebook(CLONE / "notebooks" / nb.name, out)
        print(f"  {nb.name}: {'ok' if not error else error}", flush=True)
        if error:
            failures.append(f"{nb.name}: {error}")
    return restarts, failures


def widget_shown(executed: Path) -> bool:
    """Notebook 06 showed the chat widget: a widget view with the chat box's plain-text note."""
    import re

    # The note lib/ship/chat.py writes (read from its source: importing lib here would load torch for nothing).
    WIDGET_TEXT = re.search(r'^WIDGET_TEXT = "(.*)"$', (REPO / "lib/ship/chat.py").read_text(), re.M).group(1)  # noqa: N806
    cells = json.loads(executed.read_text())["cells"]
    outs = [o.get("data", {}) for c in cells for o in c.get("outputs", [])]
    text = ["".join(d.get("text/plain", "")) for d in outs]  # nbformat may keep a text as a list of lines
    return any("application/vnd.jupyter.widget-view+json" in d and t == WIDGET_TEXT for d, t in zip(outs, text))


def changed_lines(before: dict, after: dict) -> list[str]:
    names = sorted(set(before) | set(after))
    return [f"{n} {before.get(n, '-')} -> {after.get(n, '-')}" for n in names if before.get(n) != after.get(n)]


def report(python: Path, before: dict, after: dict, restarts: list[str], failures: list[str], work: Path) -> int:
    print(f"Python {sys.version.split()[0]} (Colab: {COLAB_PYTHON}); torch {before.get('torch')} CPU build "
          f"(Colab: {COLAB_TORCH}; its CPU build is on PyTorch's own index, out of reach here)")
    pinned = [line.split("==")[0].lower().replace("_", "-") for line in PACKAGES.read_text().splitlines()
              if "==" in line and not line.startswith("#")]
    print("Colab's versions used: " + " ".join(f"{n}=={before.get(n)}" for n in pinned))
    changes = changed_lines(before, after)
    print("pip changed (the setup cells' install; notebook 06's llama.cpp for the GGUF export): " + ("; ".join(changes) or "nothing"))
    torch_changed = [c for c in changes if c.startswith("torch")]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    print("pip check: " + check.stdout.strip().replace("\n", "; "))
    print("restart needed: " + ("; ".join(restarts) if restarts else "no"))
    last = HOME / "executed" / NOTEBOOKS[-1].name
    widget = last.exists() and widget_shown(last)
    print(f"chat widget (ipywidgets {after.get('ipywidgets')}) shown in 06: {'yes' if widget else 'NO'}")
    runs = sorted(p.name for p in (work / "drive" / "qlora-notebooks" / "outputs").glob("*"))
    print(f"runs on the stand-in Drive: {runs}")
    problems = failures + [f"torch changed: {c}" for c in torch_changed]
    problems += [] if check.returncode == 0 else ["pip check is not clean"]
    problems += [] if widget else ["the chat widget was not shown"]
    problems += [] if runs else ["no run on the Drive"]
    print("colab-check: " + ("passed" if not problems else "FAILED: " + "; ".join(problems)))
    return 0 if not problems else 1


def main() -> int:
    print(f"colab-check: the Colab environment in {HOME} (Colab's versions, {TORCH} CPU)", flush=True)
    python = colab_env()
    before = freeze(python)
    if CONTENT.exists() and any(p not in (CLONE, CONTENT / "drive") for p in CONTENT.iterdir()):
        raise SystemExit(f"colab-check: {CONTENT} holds other files: not this check's to use")
    copy_repo()
    os.environ.pop("SFT_OUTPUTS_DIR", None)  # Colab has none: the setup cell puts the runs on the Drive
    with tempfile.TemporaryDirectory(prefix="colab-check-") as tmp:
        work = Path(tmp)
        kernel(python, work)
        os.environ["JUPYTER_PATH"] = str(work / "jupyter")
        print(f"colab-check: the notebooks in {CLONE}, kernel {python} (tiny profile)", flush=True)
        try:
            restarts, failures = run_all(work)
        finally:
            for p in (CONTENT / "drive", CLONE):
                shutil.rmtree(p, ignore_errors=True)
        return report(python, before, freeze(python), restarts, failures, work)


if __name__ == "__main__":
    sys.exit(main())
