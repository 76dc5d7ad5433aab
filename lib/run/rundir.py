"""Run-directory integrity: one writer per run, atomic stage outputs, what each result was made from.

    with run_lock(paths, "train"):                      # one writing stage per run at a time
        begin(paths, "train")                           # results of the stage are now "being written"
        ...write the outputs (each file through write_atomic / replace)...
        finish(paths, "train", ["adapter/adapter_model.safetensors", ...], inputs(paths, "prepare"))
    check_fresh(paths, "evaluate")                      # refuse eval/ made from an earlier adapter

- Lock: `outputs/.locks/<run>.lock`, held with flock(2) by the main process (rank 0 under torchrun) for
  as long as a stage writes; the kernel drops it when the process dies, so a lock of a killed
  process is taken over by the next writer. A second writer gets a LockedError naming the holder's PID.
- Manifest: `<run>/stages/<stage>.json` records the sha256 of the stage's outputs and the fingerprints
  of the stages it was computed from. `begin` writes `<stage>.pending` first and `finish` writes the
  manifest last, so a stage killed half-way is seen as interrupted (never as a mixture of old and
  new files), and a result whose inputs changed since (e.g. `train --retrain`) is refused as stale.
- Run directories written before manifests existed (no manifest, no pending marker) are accepted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from lib.run.errors import SFTError
from lib.run.stages import stage as _stage


class LockedError(SFTError):
    """Another live process is writing into this run directory."""


class RunDirError(SFTError):
    """A result in the run directory is damaged, half-written or stale: rerun the stage that makes it."""


def rerun(paths, stage: str, extra: str = "") -> str:
    return _stage(stage).rerun(paths.root.name, extra)


# --------------------------------------------------------------------------------------------
# Writing files


def write_atomic(path, data: str | bytes) -> Path:
    """Write a file through a temp file in the same folder and a rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> Path:
    """One JSON value a line (data/train.jsonl, eval/predictions.jsonl), written atomically."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_text(path, what: str = "") -> str:
    """The UTF-8 text of the regular file `path`. A FIFO, device or folder in its place is refused without
    being read (reading a FIFO would wait forever); a missing or unreadable file raises SFTError naming the
    file (and `what`, e.g. "rerun notebook 04_evaluate_perplexity", after a semicolon)."""
    path = Path(path)
    tail = f"; {what}" if what else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:  # the builtin: an fd of a regular file checked below
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SFTError(f"{path}: not a regular file (a FIFO, device or folder){tail}")
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise SFTError(f"{path}: not found{tail}") from None
    except OSError as e:
        raise SFTError(f"{path}: cannot read the file ({e.strerror or e}){tail}") from None
    except UnicodeDecodeError as e:
        raise SFTError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}){tail}") from None


def read_json(path, what: str = "") -> object:
    """The JSON value in `path` (read_text's checks: a regular UTF-8 file). Anything else, or text that is
    not JSON, raises SFTError naming the file; check `exists()` first where a missing file is normal."""
    text = read_text(path, what)
    tail = f"; {what}" if what else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SFTError(f"{path}: invalid JSON ({e.msg}){tail}") from None
    except (RecursionError, ValueError) as e:  # nested too deep; a number of more than 4,300 digits
        raise SFTError(f"{path}: invalid JSON ({str(e).splitlines()[0][:80] or 'nested too deep'}){tail}") from None


def replace(src, dst) -> None:
    """Move a file or folder `src` over `dst` (a folder is swapped in: the old one is removed after)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@contextlib.contextmanager
def staging(folder, prefix: str):
    """A fresh folder inside `folder` (named prefix + 8 random characters, with the permissions of any
    folder the user makes) to build results in before `install` moves them in; removed on the way out,
    whatever happens. `remove_leftovers(folder, re.escape(prefix) + r"\\w{8}")` clears a killed writer's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder, pattern: str) -> list[Path]:
    """Remove what a killed writer left in `folder`: entries whose name fully matches the regex `pattern`.

    Call it while holding the run's lock, so that a live writer's temp folder is never taken."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    rx = re.compile(pattern)
    gone = []
    for p in folder.iterdir():
        if rx.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


# --------------------------------------------------------------------------------------------
# One writer per run

_held: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within a process


def is_main_rank() -> bool:
    """Whether this is the process that writes (rank 0 under torchrun / accelerate; a lone process)."""
    return os.environ.get("RANK", "0") in ("0", "")


def lock_path(paths) -> Path:
    return paths.lock


def _holder(path: Path) -> str:
    for _ in range(20):  # the holder writes its PID right after taking the lock
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return "unknown"


@contextlib.contextmanager
def run_lock(paths, stage: str):
    """Hold the run's lock while `stage` writes; raise LockedError if another live process holds it.

    Only the main process takes it (rank 0 under torchrun; the other ranks write nothing of their own)."""
    if not is_main_rank():
        yield
        return
    path = lock_path(paths)
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = _holder(path)
        pid = holder.split()[0] if holder != "unknown" else "unknown"
        what = " ".join(holder.split()[1:2]) or "a stage"
        raise LockedError(
            f"run '{paths.root.name}' is being written by another process (PID {pid}, {what}); wait for it "
            f"to finish or stop it, then rerun {stage} (lock {path})") from None
    # The lock is ours (a killed holder's lock is released by the kernel): record who holds it.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {stage}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


# --------------------------------------------------------------------------------------------
# Manifests: what a stage wrote and what it was computed from


def stages_dir(paths) -> Path:
    return paths.stages


def _manifest(paths, stage) -> Path:
    return stages_dir(paths) / f"{stage}.json"


def _pending(paths, stage) -> Path:
    return stages_dir(paths) / f"{stage}.pending"


def file_hash(path) -> str:
    """sha256 of a regular file; a FIFO or device in its place is refused (SFTError), never waited on."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:  # the builtin: an fd of a regular file checked below
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SFTError(f"{path}: not a regular file (a FIFO, device or folder)")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def begin(paths, stage: str) -> None:
    """Mark the stage's results as being rewritten: until finish(), readers treat them as interrupted."""
    if not is_main_rank():
        return
    write_atomic(_pending(paths, stage), f"{os.getpid()}\n")
    _manifest(paths, stage).unlink(missing_ok=True)


def finish(paths, stage: str, outputs, inputs: dict | None = None) -> dict:
    """Record the stage's outputs (paths relative to the run directory) and inputs; the last write of a stage."""
    if not is_main_rank():
        return {}
    hashes = {str(o): file_hash(paths.root / o) for o in outputs}
    manifest = {
        "stage": stage,
        "fingerprint": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16],
        "outputs": hashes,
        "inputs": dict(inputs or {}),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(_manifest(paths, stage), manifest)
    _pending(paths, stage).unlink(missing_ok=True)
    return manifest


def install(paths, stage: str, moves: dict, outputs, inputs: dict | None = None) -> dict:
    """Install a stage's outputs as a whole: begin, move each staged file or folder in, finish.

    moves: {target path: staged path}. Killed at any point, readers see the stage as interrupted
    (rerun it) until the manifest, written last, says the set is complete."""
    begin(paths, stage)
    for target, staged in moves.items():
        replace(staged, target)
    return finish(paths, stage, outputs, inputs)


def is_pending(paths, stage: str) -> bool:
    """Whether the stage began rewriting its results and has not finished (killed, or running now)."""
    return _pending(paths, stage).exists()


def read_manifest(paths, stage: str) -> dict | None:
    """The stage's manifest; None for a run written before manifests. Raises RunDirError if interrupted."""
    if _pending(paths, stage).exists():
        raise RunDirError(f"{paths.root.name}: the {stage} stage was interrupted (or is still running) and its "
                          f"results are incomplete: {rerun(paths, stage)}")
    path = _manifest(paths, stage)
    if not os.path.lexists(path):
        return None
    try:
        m = read_json(path)  # a FIFO or folder in its place is refused, never waited on
        ups = m.get("inputs", {}) if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("outputs"), dict) or not isinstance(ups, dict):
            raise ValueError("not a manifest")
        for up in ups:
            _stage(up)  # KeyError naming the known stages
    except (SFTError, ValueError, KeyError) as e:
        why = str(e).removeprefix(f"{path}: ").strip('"')
        raise RunDirError(f"{path}: unreadable ({why}): {rerun(paths, stage)}") from None
    return m


def fingerprint(paths, stage: str, verify=True) -> str | None:
    """The fingerprint of the stage's current results, after checking every recorded output is intact
    (verify: True hashes every output; a collection of run-relative paths hashes only those; False none)."""
    m = read_manifest(paths, stage)
    if m is None:
        return None
    if verify:
        for rel, digest in m["outputs"].items():
            if verify is not True and rel not in verify:
                continue
            p = paths.root / rel
            if not p.is_file():
                raise RunDirError(f"{p} is missing (written by {stage}): {rerun(paths, stage)}")
            if file_hash(p) != digest:
                raise RunDirError(f"{p} is not the file {stage} wrote (changed or damaged since): "
                                  f"{rerun(paths, stage, ' --retrain' if stage == 'train' else '')}")
    return m["fingerprint"]


def inputs(paths, *stages: str) -> dict:
    """Fingerprints of the stages a new result is computed from (to pass to finish/install)."""
    return {s: fingerprint(paths, s, verify=False) for s in stages}


def stale_inputs(paths, stage: str) -> list[str]:
    """The upstream stages whose results changed since `stage` was computed ([] if fresh or unknown)."""
    m = read_manifest(paths, stage)
    if m is None:
        return []
    changed = []
    for up, recorded in m.get("inputs", {}).items():
        try:
            now = fingerprint(paths, up)
        except RunDirError:
            now = "interrupted"
        if now != recorded:
            changed.append(up)
    return changed


def check_fresh(paths, stage: str, what: str | None = None) -> None:
    """Refuse the stage's stored results if what they were computed from has changed since."""
    changed = stale_inputs(paths, stage)
    if changed:
        raise RunDirError(
            f"{what or paths.root / stage} is stale: it was computed from earlier {' and '.join(changed)} "
            f"results ({' and '.join(changed)} ran again since): {rerun(paths, stage)}")


def result_dir(paths, stage: str) -> Path:
    """The folder that holds a stage's results, for messages (merged/, eval/, export/, adapter/, ...)."""
    return paths.root / next(o.split("/")[0] for o in _stage(stage).outputs if o != "checkpoints")


def check_result(paths, stage: str, verify=True) -> str | None:
    """What every reader checks before using a stage's results: the stage is not interrupted (or running),
    its recorded outputs are intact (hashed against the manifest; `verify` as in fingerprint), and they are
    fresh all the way up: each stage they were computed from, and each of those, still holds the results
    recorded (a GGUF of a merge of an earlier adapter is stale). Returns the stage's fingerprint; raises
    RunDirError naming the stage to rerun. A run written before manifests is accepted as it is."""
    found = fingerprint(paths, stage, verify=verify)
    todo, seen = [stage], set()
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            check_fresh(paths, s, result_dir(paths, s))
            todo += list((read_manifest(paths, s) or {}).get("inputs", {}))
    return found


def unusable(paths, stage: str, verify=True) -> str | None:
    """Why a stage's results must not be read (check_result's message), or None when they may: for readers
    that leave a part out and say so instead of refusing (the summary, the pushed model card's figures)."""
    try:
        check_result(paths, stage, verify)
    except RunDirError as e:
        return str(e)
    return None


def check_files(paths, stage: str, files) -> None:
    """Check that each file (json, safetensors) of a stage can be read; a damaged one names the stage to rerun."""
    for p in files:
        p = Path(p)
        if not p.exists():
            continue  # missing files are the caller's require()
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(p), framework="pt") as f:
                    for k in f.keys():
                        f.get_slice(k)
        except Exception as e:  # any failure to parse: the file is damaged
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise RunDirError(f"{p}: damaged or unreadable ({reason}): "
                              f"{rerun(paths, stage, ' --retrain' if stage == 'train' else '')}") from None


def check_trained(paths) -> str | None:
    """The trained adapter and its summary are readable and are what train wrote; returns train's fingerprint."""
    check_files(paths, "train", [paths.adapter / "adapter_config.json", paths.adapter / "adapter_model.safetensors",
                                 paths.training_summary])
    return fingerprint(paths, "train")
