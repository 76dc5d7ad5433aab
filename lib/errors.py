"""User-facing errors: bad input, bad configuration, a stage that has not run yet.

The CLI prints `error: <message>` for these and exits 2 (3 for OutOfMemoryError), without a
traceback; notebooks show the same message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
