"""Reading data files: the records of a .json, .jsonl, .csv or .parquet file (compressed or not), of several
such files read as one data set (a folder of shards or a glob), a `datasets` save_to_disk folder or a Hub
dataset id (load_records, for 01 prepare data), and the prepared examples of a run (read_examples). Bad
input raises DataError naming the file, the line (or record) and the field. Compression and shards:
lib/data/containers.py.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lib.data.containers import compression, data_suffix, read_bytes, shard_files, shard_split
from lib.run.errors import DataError, SFTError
from lib.run.paths import resolve_repo_path
from lib.run.realmodel import hf_token
from lib.run.rundir import read_json

EVAL_SPLITS = ("test", "validation", "eval", "valid", "dev")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class RawRecord:
    """A record as read, with where it came from (for error messages) and its split, if any."""

    record: object
    file: str
    line: int | None = None
    index: int | None = None
    split: str | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(self.file, message, line=self.line, record=self.index, field=field)

    @property
    def where(self) -> dict:
        return {"line": self.line} if self.line is not None else {"record": self.index}


@dataclass
class Loaded:
    records: list[RawRecord]
    source: str
    container: str
    splits: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the files read, when more than one (shards)


# ----------------------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    raw = read_bytes(path)
    if not raw.strip():
        raise DataError(path, "the file is empty")
    if b"\x00" in raw[:8192]:
        raise DataError(path, "this is a binary file, not UTF-8 text (expected JSON, JSONL or CSV; "
                              "use .parquet for Parquet files)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                        line=line) from None


def json_value(text: str, path, line: int | None = None):
    """The JSON value of `text`, or a DataError naming the file (and line) for invalid JSON, a number of more
    than 4,300 digits, nesting deeper than Python's recursion allows, or a lone surrogate escape ("\\ud83d",
    which no UTF-8 text can hold), named by its field."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one JSON object a line? name the file .jsonl)" if "Extra data" in e.msg and line is None else ""
        raise DataError(path, f"invalid JSON ({e.msg}){hint}", line=line or e.lineno) from None
    except RecursionError:
        raise DataError(path, "invalid JSON (nested too deeply)", line=line) from None
    except ValueError as e:  # int('9' * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(path, f"invalid JSON (a number too long: {str(e).split(';')[0]})", line=line) from None
    if "\\u" in text:
        _check_surrogates(obj, path, line)
    return obj


def read_json_file(path):
    """The JSON value of one local file (a tool schema list, ...) with the data reader's checks: a regular file
    (a FIFO is never waited on), UTF-8 text, JSON within the limits of json_value; else a DataError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "a folder, not a JSON file")
    if not path.is_file():
        raise DataError(path, _not_a_file(path) if os.path.lexists(path) else "no such file")
    return json_value(_read_text(path), path)


def _check_surrogates(obj, path, line) -> None:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else [(None, obj)]
    for key, value in items:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            record = None
            if line is None and isinstance(obj, list):
                record, key = key + 1, None
            raise DataError(path, "a lone surrogate escape (\\ud800-\\udfff without its pair): not text",
                            line=line, record=record, field=key if isinstance(key, str) else None) from None


def _read_jsonl(path: Path) -> Loaded:
    text = _read_text(path)
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(RawRecord(json_value(line, path, n), str(path), line=n))
    return Loaded(records, str(path), "jsonl")


def _read_json_records(path: Path) -> Loaded:
    obj = json_value(_read_text(path), path)
    if isinstance(obj, list):
        return Loaded([RawRecord(r, str(path), index=i) for i, r in enumerate(obj, start=1)], str(path), "json")
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if lists and set(lists) & ({"train"} | set(EVAL_SPLITS)):
            records = []
            for split, items in lists.items():
                for i, r in enumerate(items, start=1):
                    records.append(RawRecord(r, f"{path}: split '{split}'", index=i, split=split))
            return Loaded(records, str(path), "json", splits=list(lists))
        if len(lists) == 1 and not any(k in obj for k in ("messages", "instruction", "text", "prompt")):
            (key, items), = lists.items()
            return Loaded([RawRecord(r, f"{path}: '{key}'", index=i) for i, r in enumerate(items, start=1)],
                          str(path), "json")
        return Loaded([RawRecord(obj, str(path), index=1)], str(path), "json")
    raise DataError(path, f"expected a JSON array of records or an object of splits, got {type(obj).__name__}")


def _read_csv(path: Path) -> Loaded:
    text = _read_text(path)
    # A field may be as long as in a JSON file (the csv module's default limit is 131,072 characters).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # strict: a quote that is never closed, or text after a closing quote, is an error (the default
    # reader would swallow the rest of the file into one field).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, header, start = [], None, 1
    try:
        for row in reader:
            if header is None:
                header = row
                if not any(h.strip() for h in header):
                    raise DataError(path, "the CSV file has no header row", line=1)
            elif len(row) > len(header):
                raise DataError(path, f"more values ({len(row)}) than header columns ({len(header)})", line=start)
            elif any(v.strip() for v in row):
                values = dict(zip(header, row + [None] * (len(header) - len(row))))
                records.append(RawRecord(values, str(path), line=start))
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(path, "unterminated quoted field (a \" that is never closed)",
                            line=_open_quote_line(text, start)) from None
        raise DataError(path, f"invalid CSV ({e})", line=reader.line_num) from None
    if header is None:
        raise DataError(path, "the CSV file has no header row")
    return Loaded(records, str(path), "csv")


def _open_quote_line(text: str, start: int) -> int:
    """The line of the quote that opens the field left unterminated, in the record starting at line `start`."""
    lines = list(io.StringIO(text, newline=""))  # lines as the csv module counts them
    pos = sum(len(line) for line in lines[:start - 1])
    opened, field_start = None, True
    while pos < len(text):
        c = text[pos]
        if opened is None:
            if c == '"' and field_start:
                opened, field_start = pos, False
            else:
                field_start = c in ",\r\n"
        elif text.startswith('""', pos):
            pos += 1  # an escaped quote inside the field
        elif c == '"':
            opened = None
        pos += 1
    if opened is None:
        return start
    done = 0
    for n, line in enumerate(lines, start=1):
        done += len(line)
        if done > opened:
            return n
    return start


def _read_parquet(path: Path) -> Loaded:
    import pyarrow.parquet as pq

    try:
        if compression(path):
            import pyarrow as pa

            table = pq.read_table(pa.BufferReader(read_bytes(path)))
        else:
            table = pq.read_table(path)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(path, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    rows = table.to_pylist()
    return Loaded([RawRecord(r, str(path), index=i) for i, r in enumerate(rows, start=1)], str(path), "parquet")


def _from_dataset_dict(dd, source: str, container: str) -> Loaded:
    from datasets import Dataset

    if isinstance(dd, Dataset):
        dd = {"train": dd}
    records, splits = [], []
    for split in dd:
        splits.append(split)
        for i, r in enumerate(dd[split], start=1):
            records.append(RawRecord(r, f"{source}: split '{split}'", index=i, split=split))
    return Loaded(records, source, container, splits=splits)


def _read_folder(path: Path) -> Loaded:
    from datasets import load_from_disk

    if not any((path / n).exists() for n in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return _read_shards(str(path), shard_files(str(path), path), path)
    try:
        dd = load_from_disk(str(path))
    except Exception as e:
        raise DataError(path, f"cannot load the datasets folder ({str(e).splitlines()[0]})") from None
    return _from_dataset_dict(dd, str(path), "save_to_disk")


def _read_hub(dataset_id: str) -> Loaded:
    from datasets import load_dataset

    try:
        dd = load_dataset(dataset_id, token=hf_token())
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(dataset_id, "not a local file or folder, and it could not be loaded as a Hugging "
                                    f"Face Hub dataset ({first})") from None
    return _from_dataset_dict(dd, dataset_id, "hub")


def _not_a_file(path: Path) -> str:
    """Why a path that exists is neither a file nor a folder to read: what it is instead."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if path.is_symlink():
            if e.errno == errno.ELOOP:
                return "a symbolic link loop: it never reaches a file"
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot be read ({e.strerror or e})"
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"not a regular file but {kind}: save the data to a file (.json, .jsonl, .csv, .parquet) first"


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json_records, ".csv": _read_csv,
            ".parquet": _read_parquet}


def _read_file(path: Path) -> Loaded:
    suffix = data_suffix(path)
    if suffix not in _READERS:
        shown = "".join(path.suffixes[-2:]).lower() or "(none)"
        raise DataError(path, f"unsupported file type '{shown}' (use .json, .jsonl, .csv or .parquet, each also "
                              "compressed as .gz, .bz2, .xz or .zst; a folder of such files, a glob such as "
                              "'data/*.jsonl', a datasets folder or a Hub dataset id)")
    loaded = _READERS[suffix](path)
    if compression(path):
        loaded.container += f" ({compression(path)[1:]})"
    return loaded


def _read_shards(source: str, files: list[Path], root: Path | None = None) -> Loaded:
    """Several files read as one data set: records in file order, each naming its own file and line; a
    file named for a split (train-*, test-*, validation/...) gives its records that split."""
    records, splits, containers = [], [], []
    named = {f: shard_split(f, root) for f in files}
    by_name = all(named.values())
    if any(named.values()) and not by_name:  # a test file read as training data would be a silent leak
        split_file, other = next(f for f in files if named[f]), next(f for f in files if not named[f])
        raise DataError(source, f"{split_file.name} is named for the '{named[split_file]}' split but {other.name} "
                                "for none: name every file for its split (train-*, test-*), or point at one "
                                "split's files with a glob")
    for f in files:
        part = _read_file(f)
        containers.append(part.container)
        for r in part.records:
            if by_name and r.split is None:
                r.split = named[f]
            records.append(r)
        for s in ([named[f]] if by_name else []) + part.splits:
            if s not in splits:
                splits.append(s)
    if splits and any(r.split is None for r in records):
        missing = next(r for r in records if r.split is None)
        raise DataError(missing.file, "some files of this data set have splits and others not: name each "
                                      "file for its split (train-*, test-*) or point at one split's files")
    kinds = sorted(set(containers))
    return Loaded(records, source, f"{len(files)} {'/'.join(kinds)} files", splits=splits,
                  files=[str(f) for f in files])


def load_records(source: str) -> Loaded:
    """Read the records of a file, folder or Hub dataset id (no format check yet)."""
    try:
        path = resolve_repo_path(source)
    except (OSError, RuntimeError) as e:  # RuntimeError: Python < 3.13 on a symbolic link loop
        if isinstance(e, RuntimeError) or e.errno == errno.ELOOP:
            raise DataError(source, "a symbolic link loop: it never reaches a file") from None
        raise DataError(source, f"cannot follow this path ({e.strerror or e})") from None
    if path.is_dir():
        loaded = _read_folder(path)
    elif path.is_file():
        loaded = _read_file(path)
    elif not os.path.lexists(path) and (shards := shard_files(str(source))) is not None:
        loaded = _read_shards(str(source), shards)
    elif os.path.lexists(path) or os.path.lexists(source):
        raise DataError(source, _not_a_file(Path(source) if os.path.lexists(source) else path))
    elif _HUB_ID.match(str(source)) and not Path(str(source)).suffix:
        loaded = _read_hub(str(source))
    else:
        raise DataError(source, "no such file or folder")
    if not loaded.records:
        raise DataError(loaded.source, "no records found")
    return loaded


def read_examples(path) -> list[dict]:
    """The normalised examples of a prepared jsonl file (train.jsonl / eval.jsonl)."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():  # a FIFO would be waited on forever
        raise DataError(path, _not_a_file(path))
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", line=n) from None
            if line.strip():
                out.append(json_value(line, path, n))
    return out


def recorded_data_hash(paths) -> str | None:
    """The hash of the prepared data recorded in the run's data/report.json (what the run was made from);
    None if there is none or it is unreadable."""
    try:
        return read_json(paths.data_report).get("data_hash") if paths.data_report.exists() else None
    except (SFTError, AttributeError):
        return None
