"""Containers around data files: compressed files (.gz, .bz2, .xz, .zst) and data sets in several files
(a folder of shards, or a glob such as data/*.parquet), for lib/data/readers.py.

    from lib.data.containers import data_suffix, read_bytes, shard_files
    data_suffix(Path("train.jsonl.gz"))      # ".jsonl": the file type under the compression
    read_bytes(Path("train.jsonl.zst"))      # the decompressed bytes (DataError naming the file if corrupt)
    shard_files("data/*.jsonl")              # the files a glob or a folder of shards holds, sorted; None if neither

gzip, bz2 and lzma are Python's own; Zstandard is the `zstandard` package (a pyproject dependency).
A shard's name may say its split (train-00000-of-00002.parquet, test.jsonl.gz, data/validation/...):
`shard_split` reads it, so a Hub data set's file layout keeps its evaluation split.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import re
from pathlib import Path

from lib.run.errors import DataError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
_GLOB = re.compile(r"[*?\[]")
_SPLIT = re.compile(r"^(train|test|validation|valid|eval|dev)(?:[-_.]|$)", re.IGNORECASE)


def data_suffix(path: Path) -> str:
    """The file type under any compression suffix, lower case ('.jsonl' for train.jsonl.gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def _zstd(raw: bytes) -> bytes:
    """Every frame of `raw` (frames written without their size, by zstd's streaming mode, too); a frame cut
    short is an error, never a silently shorter file."""
    import zstandard

    out, decoder = [], zstandard.ZstdDecompressor()
    while raw:
        frame = decoder.decompressobj()
        out.append(frame.decompress(raw))
        if not frame.eof:
            raise ValueError("the data ends inside a frame (truncated)")
        raw = frame.unused_data
    return b"".join(out)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in a compression suffix."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read the file ({e.strerror or e})") from None
    kind = compression(path)
    if kind is None:
        return raw
    decode = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress, ".zst": _zstd}[kind]
    try:
        return decode(raw)
    except Exception as e:  # each library raises its own type for a damaged or truncated file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(path, f"not a readable {kind} file ({detail}): the file is damaged, truncated or not "
                              f"compressed with {kind[1:]}") from None


def is_glob(source: str) -> bool:
    return bool(_GLOB.search(source))


def _data_files(paths) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and data_suffix(p) in DATA_SUFFIXES
                  and not any(part.startswith(".") for part in p.parts[-2:]))


def shard_files(source: str, path: Path | None = None) -> list[Path] | None:
    """The data files of a glob (`data/*.jsonl`) or of a folder that is not a `datasets` save_to_disk folder
    (searched through its subfolders, hidden ones left out), sorted by path; None when `source` is
    neither. A glob or folder with no data file in it is refused, naming it."""
    if path is not None and path.is_dir():
        files = _data_files(path.rglob("*"))
        if not files:
            raise DataError(path, "no data files in this folder (expected .json, .jsonl, .csv or .parquet files, "
                                  "compressed or not, or a datasets save_to_disk folder)")
        return files
    if not is_glob(source):
        return None
    files = _data_files(Path(p) for p in glob.glob(str(Path(source).expanduser()), recursive=True))
    if not files:
        raise DataError(source, "no data file matches this pattern (.json, .jsonl, .csv or .parquet, compressed "
                                "or not)")
    return files


def shard_split(path: Path, root: Path | None = None) -> str | None:
    """The split a shard's name or folder names (train-00000-of-00002.parquet, test.jsonl, validation/x.jsonl)."""
    parts = [path.name] + ([p for p in path.relative_to(root).parts[:-1]] if root else [])
    for part in parts:
        m = _SPLIT.match(part)
        if m:
            return m[1].lower()
    return None
