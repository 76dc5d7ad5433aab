"""User-facing errors: bad input, bad configuration, a stage that has not run yet.

The CLI prints `error: <message>` for these and exits 2 (3 for OutOfMemoryError), without a
traceback; notebooks show the same message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class SFTError(Exception):
    """An error caused by the user's input or setup, with a message that says what to do."""


class ConfigError(SFTError):
    """A configuration key or value that cannot be used."""


class MissingStageError(SFTError):
    """An input of this stage is missing: an earlier notebook has not run."""


class TrainingError(SFTError):
    """Training cannot go on (e.g. a non-finite loss)."""


class OutOfMemoryError(SFTError):
    """A stage ran out of (GPU) memory: the message says where, the peak against the card, the settings
    most likely to make this run fit, and the checkpoint kept. The CLI exits 3: the input is fine, this
    machine is too small for these settings (a script can retry with smaller ones)."""

    exit_status = 3


class DiskError(SFTError):
    """Writing a result failed: the disk is full (exit 3, like out of memory: the input was fine) or the
    outputs folder cannot be written (exit 2). The message names the path, the free space, what is kept."""

    def __init__(self, message: str, full: bool):
        super().__init__(message)
        self.exit_status = 3 if full else 2


# Errors of a full, read-only or unwritable disk: OSError numbers, and the messages torch's and safetensors'
# writers raise them under (torch: "PytorchStreamWriter failed writing file ...", "unexpected pos ...").
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file stands where a folder should be",
                errno.EEXIST: "a file stands where a folder should be"}
_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "PytorchStreamWriter failed",
         "unexpected pos")
_READ_ONLY = ("Read-only file system", "os error 30")
# What a failed write leaves, by command: every stage installs its files only once all are written.
KEPT = {"prepare": "The run's earlier data and config.yaml are kept.",
        "train": "The checkpoints saved before are kept; rerunning train resumes from the newest complete one.",
        "pipeline": "The results of the stages that finished are kept."}


def disk_fault(e: BaseException) -> tuple[str, str | None, bool] | None:
    """(what went wrong, the path if known, whether the disk is full) of a full, read-only or unwritable disk
    anywhere in e's chain of causes; None for any other error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[e.errno], e.filename, e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not isinstance(e, OSError) and any(m in str(e) for m in _FULL + _READ_ONLY):
            full = not any(m in str(e) for m in _READ_ONLY)
            return f"writing a file failed ({first_line(e)[:100]})", None, full
        e = e.__cause__ or e.__context__
    return None


def free_space(path) -> str:
    """'1.20 GB free of 50.0 GB on /mount' for the file system holding `path` (or its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return f"{usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.1f} GB on {p}"


def disk_error(e: BaseException, command: str, run_root) -> DiskError | None:
    """The one-line DiskError for a disk fault in e during `command` on the run at `run_root` (None if e is
    something else): what failed, the path, the free space, what is kept, and the command to rerun."""
    fault = disk_fault(e)
    if fault is None:
        return None
    what, path, full = fault
    path = path or run_root
    kept = KEPT.get(command, f"The earlier {command} results are kept (or, if the write was cut off while "
                             "installing them, marked interrupted for the next run to redo).")
    fix = ("free some space" if full else f"move the file {path} away or set SFT_OUTPUTS_DIR to a folder"
           if "file stands" in what else f"make {path} writable (or set SFT_OUTPUTS_DIR to a writable folder)")
    again = f"python -m lib {command} --run {Path(run_root).name}"
    return DiskError(f"{what}: {path} ({free_space(path)}). {kept} Then {fix} and rerun: {again}", full)


class DataError(SFTError):
    """Bad data, located by file, line (or record) and field."""

    def __init__(self, file, message, line=None, record=None, field=None):
        self.file, self.line, self.record, self.field = str(file), line, record, field
        parts = [self.file]
        if line is not None:
            parts.append(f"line {line}")
        elif record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field '{field}'")
        self.detail = message
        super().__init__(": ".join(parts) + ": " + message)


class QualityGateError(Exception):
    """A result was computed but missed its stated tolerance (e.g. merge drift): the CLI exits 1.

    Not an SFTError: the input was fine (exit 2 is for bad input); the outcome is not good enough."""
