"""01 prepare data: load any accepted shape, normalise to conversations, account for every field, split, audit.

    python -m lib prepare --run demo --data data/examples/socratic_questions.jsonl [--format auto]

The record shapes (detected from the fields, forced with --format, or mapped with data.columns)
live in lib/formats.py, the account of where every field went in lib/fields.py. Containers:
.json, .jsonl, .csv, .parquet, a `save_to_disk` folder, or a Hub dataset id. Everything becomes
`{"messages": [...]}` except plain text (`{"text": ...}`, trained on every token). With splits,
only 'train' is trained on and every evaluation split (test, validation, ...) is kept as eval;
otherwise a seeded fraction is held out. The audit, with the run's own tokenizer, goes to
data/report.json.

Bad input raises DataError naming the file, the line (or record) and the field; nothing is
written to the run directory unless everything succeeded.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, apply_overrides, load_config, make_config, save_config, validate
from .errors import DataError, SFTError
from .fields import FieldAccount
from .figures import panel_figure, token_length_histogram
from .formats import FORMATS, convert, detect_format
from .loading import load_tokenizer
from .paths import REPO_ROOT, run_paths
from .readers import EVAL_SPLITS, Loaded, RawRecord, load_records, read_examples, recorded_data_hash
from .rundir import install, remove_leftovers, run_lock, staging, write_json
from .tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    TemplateError,
    encode_example,
    end_of_turn_token,
    stop_token_ids,
)
from .tokenization import split_for_template as split_for_turns
from .trainer_args import check_settings

__all__ = ["FORMATS", "EVAL_SPLITS", "Loaded", "RawRecord", "load_records", "read_examples", "detect_format",
           "prepare_examples", "audit", "audit_table", "fields_table", "run_prepare", "preview"]


def _trained_answers(example: dict) -> list[dict]:
    return [m for m in example["messages"] if m["role"] == "assistant" and m.get("weight", 1) != 0]


def is_empty(example: dict) -> bool:
    """Nothing to train: blank text, or no answer that is trained (weight 0 on all) and not blank."""
    if "text" in example:
        return not example["text"].strip()
    return not any(m["content"].strip() for m in _trained_answers(example))


def _key(example: dict) -> str:
    body = example.get("text") if "text" in example else example["messages"]
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


# ----------------------------------------------------------------------------- normalise + split


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
    examples, splits, dropped = [], [], 0
    for rec in loaded.records:
        if loaded.splits and rec.split not in keep:
            continue  # a split that is neither trained nor evaluated on (said in the notes)
        converted = convert(rec, fmt, columns)
        account.add(rec, converted)
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
    return examples, splits, dropped, account


def prepare_examples(source: str, fmt: str = "auto", eval_fraction: float = 0.1, seed: int = 42,
                     max_examples: int | None = None, system_prompt: str | None = None,
                     columns: dict | None = None, ignore_fields=()) -> Prepared:
    """Load, validate, normalise, account for every field, and split. Raises DataError on the first bad
    record, and on a text field that most records hold and nothing uses (lib/fields.py)."""
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
    notes = notes + account.warnings()
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
                    account.rows(), weight0)


# ----------------------------------------------------------------------------- audit


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def suggest_max_length(lengths: list[int], coverage: float = 0.99, multiple: int = 64) -> int:
    """The smallest multiple of `multiple` that fits `coverage` of the examples whole."""
    p = _percentile(sorted(lengths), coverage)
    return max(multiple, int(math.ceil(p / multiple)) * multiple)


def _example_error(prepared: Prepared, ex: dict, i: int, message: str) -> DataError:
    where = ex.get("metadata", {})
    turn = f" (assistant turn {where['turn']} of {where['turns']})" if "turn" in where else ""
    return DataError(prepared.source, message + turn, line=where.get("line"),
                     record=None if "line" in where else where.get("record", i))


def split_examples_for(tokenizer, examples: list[dict]) -> list[dict]:
    """`examples` with each conversation the chat template cannot train whole split per assistant turn."""
    return [part for ex in examples for part in split_for_turns(tokenizer, ex)]


def split_for_template(prepared: Prepared, tokenizer) -> int:
    """Split, in place, the conversations the chat template cannot train whole (it rewrites earlier
    turns, e.g. drops <think> blocks) into one example per assistant turn; returns how many were split."""
    n_split = 0
    for attr in ("train", "eval"):
        out = []
        for i, ex in enumerate(getattr(prepared, attr), start=1):
            try:
                parts = split_for_turns(tokenizer, ex)
            except TemplateError as e:
                raise _example_error(prepared, ex, i, str(e)) from None
            n_split += len(parts) > 1
            out += parts
        setattr(prepared, attr, out)
    return n_split


def _encode_all(prepared: Prepared, tokenizer, examples, max_length: int, allow_missing_stop: bool) -> list[dict]:
    """encode_example of each example; an answer trained without a stop token is an error naming the
    example, unless allow_missing_stop."""
    out = []
    for i, ex in enumerate(examples, start=1):
        try:
            enc = encode_example(tokenizer, ex, max_length)
        except TemplateError as e:
            raise _example_error(prepared, ex, i, str(e)) from None
        if enc["n_eot"] < enc["n_answers"] and not allow_missing_stop:
            raise _example_error(prepared, ex, i, (
                f"{enc['n_answers'] - enc['n_eot']} answer(s) would be trained without an end-of-turn token "
                "(the chat template writes none after them), so the model would not learn to stop: "
                "choose data.prompt_format (e.g. chatml) or set data.allow_missing_stop=true"))
        out.append(enc)
    return out


def _tally(enc_train: list[dict], enc_eval: list[dict], max_length: int) -> dict:
    """The counts the audit reports, summed over the encoded training (and evaluation) examples."""
    return {
        "answers": sum(e["n_answers"] for e in enc_train),
        "cut": sum(e["n_cut"] for e in enc_train),
        "eot": sum(e["n_eot"] for e in enc_train),
        "trained": sum(e["n_trained"] for e in enc_train),
        "kept": sum(min(e["length"], max_length) for e in enc_train),
        "no_tokens": sum(1 for e in enc_train if e["n_trained"] == 0),
        "folded": sum(1 for e in enc_train + enc_eval if e["system_folded"]),
        "appended": sum(e["n_stop_appended"] for e in enc_train),
    }


def _histogram(lengths: list[int]) -> dict:
    """Token lengths in 5 to 30 equal-width integer bins: {"bin_edges": [...], "counts": [...]}."""
    bins = min(30, max(5, len(set(lengths))))
    lo, hi = (min(lengths), max(lengths)) if lengths else (0, 1)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * bins
    for v in lengths:
        counts[min(bins - 1, (v - lo) // width)] += 1
    return {"bin_edges": [lo + i * width for i in range(bins + 1)], "counts": counts}


def _audit_warnings(prepared: Prepared, tokenizer, t: dict, lengths: list[int], max_length: int,
                    template_added: bool, n_split: int) -> list[str]:
    warnings = []
    if t["cut"]:
        warnings.append(f"{t['cut']} of {t['answers']} answers are cut by max_length={max_length} "
                        f"(suggested max_length: {suggest_max_length(lengths)})")
    if t["no_tokens"]:
        warnings.append(f"{t['no_tokens']} training examples keep no answer token after truncation (they teach nothing)")
    if t["eot"] < t["answers"]:
        warnings.append(f"{t['answers'] - t['eot']} of {t['answers']} answers are trained without an end-of-turn "
                        "token (data.allow_missing_stop is on): the model may not learn to stop")
    if t["folded"]:
        warnings.append(f"the chat template accepts no system message: it was folded into the first user turn "
                        f"of {t['folded']} examples (chat does the same)")
    if n_split:
        warnings.append(f"the chat template rewrites earlier turns (e.g. drops <think> blocks): {n_split} "
                        "conversations were split into one example per assistant turn, each rendered as at inference")
    warnings.extend(prepared.notes)
    if prepared.dropped_empty:
        warnings.append(f"{prepared.dropped_empty} records with no answer to train (empty, or every answer at "
                        "weight 0) were dropped")
    if prepared.duplicates:
        warnings.append(f"{prepared.duplicates} duplicate examples (kept; remove them if unintended)")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        warnings.append("the pad token is missing or equals eos; padding is masked from the loss, but "
                        "generation may confuse padding and stopping")
    if template_added:
        warnings.append("the tokenizer has no chat template; a default one was added and is saved with the adapter")
    if not prepared.eval:
        warnings.append("no evaluation examples (data.eval_fraction=0 and no test split): "
                        "eval loss and perplexity cannot be measured")
    return warnings


def audit(prepared: Prepared, tokenizer, max_length: int, template_added: bool = False,
          allow_missing_stop: bool = False, n_split: int = 0) -> dict:
    """The pre-flight report: counts, lengths, truncation, trainable share, EOS, pad, template.

    Raises DataError naming the first example whose answer is trained without a stop token,
    unless allow_missing_stop (data.allow_missing_stop).
    """
    if not prepared.train:
        raise DataError(prepared.source, "no training examples")
    enc_train = _encode_all(prepared, tokenizer, prepared.train, max_length, allow_missing_stop)
    enc_eval = _encode_all(prepared, tokenizer, prepared.eval, max_length, allow_missing_stop)
    lengths = [e["length"] for e in enc_train]
    s = sorted(lengths)
    t = _tally(enc_train, enc_eval, max_length)
    if t["trained"] == 0:
        raise DataError(prepared.source, f"nothing left to train on: with max_length={max_length} no answer "
                                         f"token of any training example is kept (raise train.max_length)")
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    return {
        "source": prepared.source,
        "container": prepared.container,
        "format": prepared.format,
        "counts": {"train": len(prepared.train), "eval": len(prepared.eval),
                   "dropped_empty": prepared.dropped_empty, "duplicates": prepared.duplicates,
                   "weight0_answers": prepared.weight0_answers},
        "fields": prepared.fields,
        "eval_from": prepared.eval_from,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "max_length": max_length,
        "token_lengths": {
            "min": s[0], "mean": round(sum(s) / len(s), 1), "p50": _percentile(s, 0.5),
            "p95": _percentile(s, 0.95), "p99": _percentile(s, 0.99), "max": s[-1],
            "histogram": _histogram(lengths), "eval_max": max((e["length"] for e in enc_eval), default=0),
        },
        "truncation": {"answers": t["answers"], "answers_cut": t["cut"],
                       "examples_over_max_length": sum(1 for v in lengths if v > max_length),
                       "examples_without_trained_tokens": t["no_tokens"],
                       "suggested_max_length": suggest_max_length(lengths)},
        "trainable_token_share": round(t["trained"] / max(1, t["kept"]), 4),
        "trained_tokens": t["trained"],
        "end_of_turn": {"token": end_of_turn_token(tokenizer), "answers_ending_with_it": t["eot"],
                        "answers": t["answers"], "answers_without_stop": t["answers"] - t["eot"],
                        "stop_appended_to_final_answer": t["appended"], "stop_token_ids": stop_token_ids(tokenizer)},
        "template": {"system_folded_examples": t["folded"], "conversations_split_per_turn": n_split},
        "pad_token": pad, "eos_token": eos, "pad_distinct_from_eos": pad is not None and pad != eos,
        "chat_template_present": not template_added,
        "warnings": _audit_warnings(prepared, tokenizer, t, lengths, max_length, template_added, n_split),
    }


def audit_table(report: dict):
    """The audit as a two-column table (pandas DataFrame) for the notebook."""
    import pandas as pd

    tl, tr, eot = report["token_lengths"], report["truncation"], report["end_of_turn"]
    rows = [
        ("format", report["format"]),
        ("training examples", report["counts"]["train"]),
        ("evaluation examples", f"{report['counts']['eval']} ({report['eval_from']})"),
        ("empty records dropped", report["counts"]["dropped_empty"]),
        ("duplicate examples", report["counts"]["duplicates"]),
        ("answers marked as context (weight 0, not trained)", report["counts"].get("weight0_answers", 0)),
        ("tokens per example (min / median / p95 / max)", f"{tl['min']} / {tl['p50']} / {tl['p95']} / {tl['max']}"),
        ("max_length", report["max_length"]),
        ("answers cut by max_length", f"{tr['answers_cut']} of {tr['answers']}"),
        ("suggested max_length (fits 99%)", tr["suggested_max_length"]),
        ("trainable-token share", f"{report['trainable_token_share']:.1%}"),
        ("answers ending with end-of-turn token", f"{eot['answers_ending_with_it']} of {eot['answers']} ({eot['token']})"),
        ("system message folded into the first user turn", f"{report['template']['system_folded_examples']} examples"),
        ("conversations split one assistant turn per example", report["template"]["conversations_split_per_turn"]),
        ("pad token distinct from eos", f"{report['pad_distinct_from_eos']} (pad={report['pad_token']!r}, eos={report['eos_token']!r})"),
        ("chat template present", report["chat_template_present"]),
        ("warnings", len(report["warnings"])),
    ]
    return pd.DataFrame(rows, columns=["check", "value"]).set_index("check")


# ----------------------------------------------------------------------------- files


def fields_table(report: dict):
    """Where every field of the input went (pandas DataFrame): used as what, metadata, copy, ignored, unused."""
    import pandas as pd

    rows = [(f["field"], f["use"], f["records"], f["text_records"], f["example"]) for f in report.get("fields", [])]
    return pd.DataFrame(rows, columns=["field", "used as", "records", "with text", "example"]).set_index("field")


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def data_hash(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def tokenizer_with_template_flag(cfg: RunConfig):
    """(the run's tokenizer, exactly as training loads it; whether a default chat template was added)."""
    tok = load_tokenizer(cfg)
    return tok, tok.chat_template == DEFAULT_CHAT_TEMPLATE


def prepare(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Prepare the data of `cfg` into outputs/<run>/: config.yaml, data/*.jsonl, data/report.json.

    Everything is computed before anything is written, and written into a temporary folder that
    is then moved in place, so a failure leaves the run directory as it was.
    """
    paths = run_paths(cfg.run)
    d = cfg.data
    prepared = prepare_examples(d.path, d.format, d.eval_fraction, d.seed, d.max_examples, d.system_prompt,
                                d.columns, d.ignore_fields)
    tokenizer, added = tokenizer_with_template_flag(cfg)
    n_split = split_for_template(prepared, tokenizer)
    report = audit(prepared, tokenizer, cfg.train.max_length, template_added=added,
                   allow_missing_stop=d.allow_missing_stop, n_split=n_split)
    report["prompt_format"] = d.prompt_format
    if not prepared.eval and cfg.train.eval_strategy != "no":
        cfg.train.eval_strategy = "no"
        report["warnings"].append("train.eval_strategy set to 'no' since there is no evaluation split")
    cfg.data.format = prepared.format if d.format == "auto" else d.format
    check_training_settings(cfg, paths, has_eval=bool(prepared.eval))

    paths.root.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(paths, "prepare"):
        # staging folders of a prepare that was killed (no live writer: we hold the lock)
        remove_leftovers(paths.root.parent, re.escape(f".{cfg.run}-prepare-") + r"[A-Za-z0-9_]{8}")
        return _write_prepared(cfg, paths, prepared, report, overwrite)


def _write_prepared(cfg, paths, prepared, report, overwrite) -> dict:
    with staging(paths.root.parent, f".{cfg.run}-prepare-") as tmp:
        (tmp / "data").mkdir()
        write_jsonl(tmp / "data" / "train.jsonl", prepared.train)
        write_jsonl(tmp / "data" / "eval.jsonl", prepared.eval)
        report["data_hash"] = data_hash([tmp / "data" / "train.jsonl", tmp / "data" / "eval.jsonl"])
        write_json(tmp / "data" / "report.json", report)
        save_config(cfg, tmp / "config.yaml")
        _install(tmp, paths, report["data_hash"], overwrite)
    return report


def check_training_settings(cfg: RunConfig, paths, has_eval: bool) -> None:
    """Refuse, before config.yaml is written, a setting training would refuse (layer names, optimizer,
    scheduler, tracker...). The device-dependent ones (train.precision, model.attn_implementation)
    are left to training, which may run on another machine (a GPU runtime)."""
    neutral = apply_overrides(cfg, {"train.precision": "auto", "model.attn_implementation": "sdpa"})
    check_settings(neutral, paths, has_eval=has_eval)


def _install(tmp: Path, paths, new_hash: str, overwrite: bool) -> None:
    """Move the prepared files into the run directory, guarding results made from other data."""
    later = [p for p in (paths.checkpoints, paths.adapter, paths.eval_dir, paths.merged) if p.exists()]
    if paths.root.exists() and later:
        old_hash = recorded_data_hash(paths)
        if old_hash != new_hash:
            if not overwrite:
                raise SFTError(
                    f"run '{paths.root.name}' already holds results trained on other data ({later[0].name}/); "
                    "choose another run name, or overwrite it (OVERWRITE = True in notebook 01, "
                    "--overwrite on the command line)")
            shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    # All four files as one: a kill between two moves leaves the stage marked interrupted, never a mixture.
    moves = {paths.data_dir / n: tmp / "data" / n for n in ("train.jsonl", "eval.jsonl", "report.json")}
    moves[paths.config] = tmp / "config.yaml"
    data = paths.data_dir.name
    install(paths, "prepare", moves, [f"{data}/train.jsonl", f"{data}/eval.jsonl", f"{data}/report.json"])


def run_prepare(run: str, data: str | None = None, fmt: str = "auto", profile: str | None = None,
                overrides=(), overwrite: bool = False) -> dict:
    """Entry point of notebook 01 and `python -m lib prepare`: returns the audit report."""
    cfg = make_config(profile, run=run, overrides=overrides or [])
    if data is not None:
        cfg.data.path = str(data)
    if fmt and fmt != "auto":
        cfg.data.format = fmt
    validate(cfg)
    report = prepare(cfg, overwrite=overwrite)
    paths = run_paths(run)
    print(f"prepared {report['counts']['train']} training and {report['counts']['eval']} evaluation examples "
          f"({report['format']}) into {paths.data_dir}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    return report


def load_run_config(run: str) -> RunConfig:
    """The run's config.yaml (raises MissingStageError naming notebook 01 if it is missing)."""
    return load_config(run_paths(run).config)


def token_length_figure(report: dict):
    """Histogram of tokens per training example with max_length marked (the panel notebook 05 draws too)."""
    return panel_figure("token_lengths", {"token_lengths": token_length_histogram(report)})


def preview(run: str, index: int | None = None, split: str = "train") -> str:
    """One prepared example as the model sees it, trained tokens shown between « and ».

    index None: the first example with the most answers (trained or weight-0 context) (a multi-turn one when there is
    one), so every answer's span and stop token can be checked by eye. An example split off a
    conversation (templates that rewrite history) is headed by which assistant turn it trains.
    """
    paths = run_paths(run)
    cfg = load_config(paths.config)
    tokenizer, _ = tokenizer_with_template_flag(cfg)
    examples = read_examples(paths.train_data if split == "train" else paths.eval_data)
    if not examples:
        return f"(no {split} examples)"
    head = ""
    if index is None:
        def answers(ex):
            return sum(m["role"] == "assistant" for m in ex.get("messages") or [])  # weight-0 ones shown as context

        index = max(range(len(examples)), key=lambda i: (answers(examples[i]), -i))
        if answers(examples[index]) < 2:  # show how a conversation is trained with a sample one
            sample = REPO_ROOT / "data" / "examples" / "socratic_dialogues.json"
            convs = split_examples_for(tokenizer, prepare_examples(str(sample), eval_fraction=0.0).train)
            examples, index = convs, max(range(len(convs)), key=lambda i: (answers(convs[i]), -i))
            head = f"(no multi-turn conversation in this run's data; one from {sample.name} with this run's template)\n"
    example = examples[index % len(examples)]
    enc = encode_example(tokenizer, example, cfg.train.max_length)
    meta = example.get("metadata", {})
    if "turn" in meta:
        head += (f"(assistant turn {meta['turn']} of {meta['turns']} of a conversation the chat template rewrites; "
                 "earlier answers are untrained context)\n")
    out, run_ids, trained = [head], [], False
    for tid, lab in zip(enc["input_ids"], enc["labels"]):
        now = lab != IGNORE_INDEX
        if now != trained and run_ids:
            text = tokenizer.decode(run_ids)
            out.append(f"«{text}»" if trained else text)
            run_ids = []
        trained = now
        run_ids.append(tid)
    if run_ids:
        text = tokenizer.decode(run_ids)
        out.append(f"«{text}»" if trained else text)
    return "".join(out)
