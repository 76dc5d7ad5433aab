"""The examples of a data file: every record normalised to a conversation (lib/data/formats.py), every field
accounted for (lib/data/fields.py), empty ones dropped, duplicates counted, and split into train and eval.

    from lib.data.examples import prepare_examples
    p = prepare_examples("data/examples/socratic_questions.jsonl", eval_fraction=0.1, seed=42)
    p.train, p.eval, p.format, p.fields, p.notes

With splits in the data, only 'train' is trained on and every evaluation split (test, validation,
...) is kept as eval; otherwise a seeded fraction is held out. Bad input raises DataError naming the
file, the line (or record) and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from lib.data.fields import FieldAccount
from lib.data.formats import FORMATS, convert, detect_format
from lib.data.readers import EVAL_SPLITS, Loaded, load_records
from lib.run.errors import DataError, SFTError


def _trained_answers(example: dict) -> list[dict]:
    return [m for m in example["messages"] if m["role"] == "assistant" and m.get("weight", 1) != 0]


def is_empty(example: dict) -> bool:
    """Nothing to train: blank text, or no answer that is trained (weight 0 on all) and not blank."""
    if "text" in example:
        return not example["text"].strip()
    return not any(m["content"].strip() or m.get("tool_calls") for m in _trained_answers(example))


def _key(example: dict) -> str:
    body = example.get("text") if "text" in example else [example["messages"], example.get("tools")]
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    format: str
    source: str
    container: str
    eval_from: str
    dropped_empty: int
    duplicates: int
    notes: list[str] = field(default_factory=list)  # how the data's splits were used, for the audit
    fields: list[dict] = field(default_factory=list)  # where every field went (FieldAccount.rows)
    weight0_answers: int = 0  # answers the data marks as context ("weight": 0), never trained
    files: list[str] = field(default_factory=list)  # the files read as this data set, when more than one
    sources: list[dict] | None = None  # a mix of several sources (lib/data/sources.py): each one's label, path, weight


def split_roles(loaded: Loaded) -> tuple[list[str], list[str], list[str]]:
    """Which of the data's splits are trained on and which are kept for evaluation, and notes saying so.

    Only the 'train' split is trained on (or the one split that is not an evaluation split, when
    there is no 'train'); every evaluation split (test, validation, eval, valid, dev) is kept for
    evaluation, never trained on; any other split is left out, with a note. Several splits none of
    which is 'train' are refused: which one to train on would be a guess.
    """
    if not loaded.splits:
        return [], [], []
    evals = [s for s in loaded.splits if s in EVAL_SPLITS]
    others = [s for s in loaded.splits if s not in EVAL_SPLITS]
    if "train" in others:
        train = ["train"]
    elif len(others) <= 1:
        train = others
    else:
        raise DataError(loaded.source, f"the data has the splits {', '.join(loaded.splits)} but none is named "
                                       "'train': name the split to train on 'train'")
    counts = {s: sum(1 for r in loaded.records if r.split == s) for s in loaded.splits}
    notes = []
    if len(evals) > 1:
        notes.append(f"the data has {len(evals)} evaluation splits ({', '.join(evals)}): all are kept for "
                     "evaluation, none is trained on")
    for s in others:
        if s not in train:
            notes.append(f"split '{s}' ({counts[s]} records) is left out: neither trained nor evaluated on "
                         "(only 'train' is trained on)")
    return train, evals, notes


def _normalise_all(loaded: Loaded, fmt: str, columns, ignore_fields, keep: set, system_prompt):
    """Every record of the kept splits as an example, its split, how many had nothing to train, and
    the field account (checked: a text field nothing uses stops here)."""
    account = FieldAccount(fmt, ignore_fields)
    examples, splits, dropped, openers = [], [], 0, []
    for rec in loaded.records:
        if loaded.splits and rec.split not in keep:
            continue  # a split that is neither trained nor evaluated on (said in the notes)
        converted = convert(rec, fmt, columns)
        account.add(rec, converted)
        if converted.dropped_turns:
            openers.append((rec, converted.dropped_turns))
        ex = converted.example
        if is_empty(ex):
            dropped += 1
            continue
        if system_prompt and "messages" in ex and ex["messages"][0]["role"] != "system":
            ex["messages"].insert(0, {"role": "system", "content": system_prompt})
        examples.append(ex)
        splits.append(rec.split)
    account.check(loaded.source)
    if not examples:
        raise DataError(loaded.source, f"nothing left to train on: all {dropped} records have empty answers "
                                       "(or every answer at weight 0)")
    account.opener_note = _openers_note(openers)
    return examples, splits, dropped, account


def _openers_note(openers: list) -> str | None:
    """The audit line for the assistant turns dropped at the start of conversations, or None."""
    if not openers:
        return None
    rec = openers[0][0]
    where = f"line {rec.line}" if rec.line is not None else f"record {rec.index}"
    return (f"{len(openers)} conversations opened with an assistant turn before any user turn (e.g. a greeting; the "
            f"first in {rec.file}, {where}): those {sum(n for _, n in openers)} turns were dropped, as FastChat "
            "does (nothing prompts them)")


def prepare_examples(source: str, fmt: str = "auto", eval_fraction: float = 0.1, seed: int = 42,
                     max_examples: int | None = None, system_prompt: str | None = None,
                     columns: dict | None = None, ignore_fields=()) -> Prepared:
    """Load, validate, normalise, account for every field, and split. Raises DataError on the first bad
    record, and on a text field that most records hold and nothing uses (lib/data/fields.py)."""
    loaded = load_records(source)
    if fmt == "auto" or (columns and fmt == "columns"):
        fmt = detect_format(loaded.records[0], columns)
    elif fmt not in FORMATS:
        raise SFTError(f"unknown format '{fmt}' (formats: auto, {', '.join(FORMATS)})")
    elif columns:
        raise SFTError(f"data.format={fmt} and data.columns both say how to read the records: keep one "
                       "(data.format=auto with data.columns)")
    train_splits, eval_splits, notes = split_roles(loaded)
    keep = set(train_splits) | set(eval_splits)
    examples, splits, dropped, account = _normalise_all(loaded, fmt, columns, ignore_fields, keep, system_prompt)
    notes = notes + account.warnings() + ([account.opener_note] if account.opener_note else [])
    weight0 = sum(1 for ex in examples for m in ex.get("messages") or []
                  if m["role"] == "assistant" and m.get("weight", 1) == 0)
    seen, dups = set(), 0
    for ex in examples:
        k = _key(ex)
        dups += k in seen
        seen.add(k)

    if eval_splits:
        train = [ex for ex, s in zip(examples, splits) if s in train_splits]
        evals = [ex for ex, s in zip(examples, splits) if s in eval_splits]
        names = " and ".join(f"'{s}'" for s in eval_splits)
        eval_from = f"the {names} split{'s' if len(eval_splits) > 1 else ''} of the data"
        if not train:
            which = f"the {' or '.join(repr(s) for s in train_splits)} split" if train_splits else "a training split"
            raise DataError(loaded.source, f"nothing left to train on: {which} holds no examples "
                                           f"(the {names} split{'s are' if len(eval_splits) > 1 else ' is'} "
                                           "kept for evaluation)")
    else:
        train = [ex for ex, s in zip(examples, splits) if not loaded.splits or s in train_splits]
        examples = train
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = 0
        if eval_fraction > 0 and len(examples) >= 2:
            n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
        eval_idx = set(order[:n_eval])
        train = [examples[i] for i in range(len(examples)) if i not in eval_idx]
        evals = [examples[i] for i in sorted(eval_idx)]
        eval_from = f"{n_eval} examples held out at random (data.eval_fraction={eval_fraction}, seed {seed})"
    if max_examples is not None:
        train = train[:max_examples]
    return Prepared(train, evals, fmt, loaded.source, loaded.container, eval_from, dropped, dups, notes,
                    account.rows(), weight0, loaded.files)
