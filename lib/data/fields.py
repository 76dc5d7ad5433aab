"""The field account: where every field of the input went, so that no text is dropped unseen.

    account = FieldAccount("dolly", ignore=cfg.data.ignore_fields)
    for rec in records: account.add(rec, convert(rec, "dolly"))
    account.check(source)        # DataError: a text field nothing uses, in most records
    account.rows(), account.warnings()

Each field of each record is one of: used (and as what: "user turn", "assistant answer (trained)",
...), known metadata (ids, source, category...: kept in the example's metadata), a copy of text the
model already sees (UltraChat's `prompt`, Alpaca's rendered `text`), ignored (`data.ignore_fields`),
or unused. A field that holds text in more than half of the records and that nothing uses stops
prepare with one line naming the file, the field and the two ways on (map it with `data.columns`,
or list it in `data.ignore_fields`); one holding text in fewer records is a warning in the audit.
Keys of turns that nothing uses are counted the same way, as `messages[].name`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from lib.data.formats import known_metadata
from lib.data.readers import RawRecord
from lib.data.turns import Converted
from lib.run.errors import DataError
from lib.run.formatting import mark_cut

UNUSED = "unused (kept as metadata, never seen by the model)"
IGNORED = "ignored (data.ignore_fields)"
METADATA = "metadata (kept with the example, never seen by the model)"
NOT_TRAINED = "not trained"
RENDERED = "copy: the whole record rendered as text"
# An unused field named like this decides what is trained (OpenAI's weight, LLaMA-Factory's loss_weight,
# Axolotl's train): ignoring it would train what the data says not to, so any value of it is refused.
_TRAINING_FLAG = re.compile(r"weight|train|mask|loss", re.IGNORECASE)


def has_text(value) -> bool:
    """Whether a value holds text: a non-blank string, or a list or object holding one."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, dict):
        return any(has_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_text(v) for v in value)
    return False


def _copy_of(value, record: dict, conv: Converted) -> str | None:
    """What `value` copies of the text the model already sees, or None."""
    if isinstance(value, list):
        same = next((f for f in conv.used if record.get(f) == value), None)
        return f"copy of '{same}'" if same else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    messages = conv.example.get("messages") or []
    if any(text == m["content"].strip() for m in messages):
        return "copy of a turn's text"
    pieces = [record[f].strip() for f in conv.used if isinstance(record.get(f), str) and record[f].strip()]
    if not pieces:
        pieces = [m["content"].strip() for m in messages if m["content"].strip()]
    if pieces and all(p in value for p in pieces):
        return RENDERED
    return None


def _other_text(value: str, record: dict, conv: Converted) -> str:
    """What a rendering of the record holds besides the used fields' text (a prompt template's words, or
    text the model would never see: the audit shows it)."""
    for f in conv.used:
        if isinstance(record.get(f), str) and record[f].strip():
            value = value.replace(record[f].strip(), " ", 1)
    return " ".join(value.split())


def _example(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else mark_cut(text[:57], True, "cut at 60 characters")


@dataclass
class FieldCount:
    """One field over the whole file."""

    records: int = 0  # records that have it
    text: int = 0  # records where it holds text
    unused_text: int = 0  # ... and nothing used it
    unused_flag: int = 0  # records where a field named like a training flag has a value nothing read
    uses: Counter = field(default_factory=Counter)
    example: str | None = None
    first_unused: RawRecord | None = None
    other_text: str = ""  # the longest text a rendering of the record holds besides the used fields


class FieldAccount:
    """Counts every field of every record by what became of it (see the module docstring)."""

    def __init__(self, fmt: str, ignore=()):
        self.format = fmt
        self.metadata = known_metadata(fmt)
        self.ignore = set(ignore or ())
        self.records = 0
        self.fields: dict[str, FieldCount] = {}
        self.opener_note: str | None = None  # assistant turns dropped before the first user turn (examples.py)

    def add(self, rec: RawRecord, conv: Converted) -> None:
        self.records += 1
        record = rec.record
        for key, value in record.items():
            if key in conv.used:
                use = conv.used[key]
            elif key in self.ignore:
                use = IGNORED
            elif key in self.metadata:
                use = METADATA
            else:
                use = (has_text(value) and _copy_of(value, record, conv)) or UNUSED
            self._count(key, use, value, rec)
            if use == RENDERED:
                other = _other_text(value, record, conv)
                c = self.fields[key]
                c.other_text = max(c.other_text, other, key=len)
        for label, value in conv.turn_extras.items():
            self._count(label, IGNORED if label in self.ignore else UNUSED, value, rec)

    def _count(self, key: str, use: str, value, rec: RawRecord) -> None:
        c = self.fields.get(key)
        if c is None:
            c = self.fields[key] = FieldCount()
        c.records += 1
        c.uses[use] += 1
        if has_text(value):
            c.text += 1
            if c.example is None:
                c.example = _example(value)
            if use == UNUSED:
                c.unused_text += 1
                c.first_unused = c.first_unused or rec
        elif c.example is None and value is not None:
            c.example = _example(value)
        if use == UNUSED and value is not None and _TRAINING_FLAG.search(key.rsplit(".", 1)[-1]):
            c.unused_flag += 1
            c.first_unused = c.first_unused or rec

    def check(self, source: str) -> None:
        """Refuse the first field that holds text in most records and that nothing uses; also an
        ignored field that a shape uses (ignoring does not drop a used field: map the fields instead)."""
        for key in sorted(self.ignore):
            c = self.fields.get(key)
            used = c and next((u for u in c.uses if u not in (IGNORED, UNUSED, METADATA)), None)
            if used:
                raise DataError(source, f"data.ignore_fields lists '{key}', which the {self.format} format uses "
                                        f"({used}); to leave it out, map the fields you want with data.columns")
        for key, c in self.fields.items():
            if c.unused_flag:
                rec = c.first_unused
                raise DataError(rec.file, "decides what is trained, but nothing reads it, so the data's choice would "
                                          "be ignored: map it as the turns' weight with data.columns (e.g. "
                                          f"{{messages: ..., weight: {key.rsplit('.', 1)[-1]}}}; 0 or 1 a turn) or "
                                          "list it in data.ignore_fields",
                                line=rec.line, record=None if rec.line is not None else rec.index, field=key)
            if c.unused_text * 2 > self.records:
                rec = c.first_unused
                unused = [k for k, o in self.fields.items() if o.unused_text * 2 > self.records]
                also = (f" (the unused text fields: data.ignore_fields=[{', '.join(unused)}])"
                        if len(unused) > 1 else "")
                raise DataError(rec.file, f"holds text in {c.unused_text} of {self.records} records and nothing uses "
                                          f"it (the {self.format} format does not read it), so the model would never "
                                          "see it: map "
                                          f"it with data.columns (e.g. {{input: {key}}}), choose another format with "
                                          f"--format, or list it in data.ignore_fields{also}",
                                line=rec.line, record=None if rec.line is not None else rec.index, field=key)

    def rows(self) -> list[dict]:
        """One row a field: field, what it became (the most common use), records with it, with text, example."""
        order = {UNUSED: 3, IGNORED: 2, METADATA: 1}
        out = []
        for key, c in self.fields.items():
            use = c.uses.most_common(1)[0][0]
            if c.unused_text and use != UNUSED:
                use = f"{use}; unused in {c.unused_text} records"
            out.append({"field": key, "use": use, "records": c.records, "text_records": c.text,
                        "unused_text_records": c.unused_text, "example": c.example})
        return sorted(out, key=lambda r: (order.get(r["use"], 0), r["field"]))

    def warnings(self) -> list[str]:
        out = []
        for key, c in sorted(self.fields.items()):
            if c.unused_text:
                out.append(f"field '{key}' holds text in {c.unused_text} of {self.records} records that nothing "
                           "uses (kept as metadata in data/*.jsonl): map it with data.columns or list it in "
                           "data.ignore_fields")
            if c.uses.get(RENDERED):
                out.append(f"field '{key}' ({c.uses[RENDERED]} records) holds every used field's text and is taken as "
                           f"a rendering of the record; besides them it holds up to {len(c.other_text)} characters, "
                           f"e.g. {_example(c.other_text)!r}: if that is data, map the field with data.columns")
            for use, n in c.uses.items():
                if use.startswith(NOT_TRAINED):
                    out.append(f"field '{key}' ({n} records) is {use}")
        for key in sorted(self.ignore - set(self.fields)):
            out.append(f"data.ignore_fields lists '{key}', which no record has")
        return out
