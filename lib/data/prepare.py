"""01 prepare data, the stage: the examples of a data file, their audit, into the run directory.

    python -m lib prepare --run demo --data data/examples/socratic_questions.jsonl [--format auto]

    from lib.data.prepare import run_prepare, preview
    report = run_prepare("demo", "data/examples/socratic_questions.jsonl", profile="tiny")

The record shapes live in lib/data/formats.py, the field account in lib/data/fields.py, normalising and
splitting in lib/data/examples.py, the audit and its tables in lib/data/audit.py. This module computes all of
them before anything is written, then installs config.yaml, data/train.jsonl, data/eval.jsonl and
data/report.json as one set (a failure leaves the run directory as it was), and shows a prepared
example with its trained tokens marked.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from lib.data.audit import audit, split_examples_for, split_for_template
from lib.data.examples import prepare_examples
from lib.data.readers import read_examples, recorded_data_hash
from lib.data.sources import prepare_data, source_rows
from lib.data.templates import DEFAULT_CHAT_TEMPLATE
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.data.tokenizer import load_tokenizer
from lib.run.config import apply_overrides, flag, load_config, make_config, save_config, validate
from lib.run.errors import SFTError
from lib.run.formatting import CUT_AT_MAX_LENGTH, mark_cut
from lib.run.paths import REPO_ROOT, run_paths
from lib.run.rundir import install, remove_leftovers, run_lock, staging, write_json, write_jsonl
from lib.run.settings import RunConfig
from lib.run.trainer_args import check_settings


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
    prepared = prepare_data(d)
    tokenizer, added = tokenizer_with_template_flag(cfg)
    n_split = split_for_template(prepared, tokenizer, d.inline_reasoning)
    report = audit(prepared, tokenizer, cfg.train.max_length, template_added=added,
                   allow_missing_stop=d.allow_missing_stop, n_split=n_split)
    report["prompt_format"] = d.prompt_format
    if prepared.files:
        report["files"] = prepared.files
    if prepared.sources:
        report["sources"] = source_rows(prepared, tokenizer, cfg.train.max_length)
    if not prepared.eval and cfg.train.eval_strategy != "no":
        cfg.train.eval_strategy = "no"
        report["warnings"].append("train.eval_strategy set to 'no' since there is no evaluation split")
    if not prepared.sources:
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
            if overwrite is not True:  # only a checked True deletes a run
                raise SFTError(
                    f"run '{paths.root.name}' already holds results trained on other data ({later[0].name}/); "
                    "choose another run name, or overwrite it (OVERWRITE = True in notebook 01, "
                    "--overwrite on the command line)")
            if paths.root.is_symlink():  # never delete through a link: what it points to may hold anything
                raise SFTError(f"{paths.root} is a symbolic link (to {paths.root.resolve()}): --overwrite does "
                               "not delete through a link; remove the link or empty the folder it points to "
                               "yourself, or choose another run name")
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
    overwrite = flag("overwrite (OVERWRITE in notebook 01)", overwrite)
    cfg = make_config(profile, run=run, overrides=overrides or [])
    if isinstance(data, (list, tuple)) and len(data) > 1:  # --data A --data B: several sources
        cfg.data.sources = [{"path": str(p)} for p in data]
    elif data is not None:
        cfg.data.path = str(data[0] if isinstance(data, (list, tuple)) else data)
    if fmt and fmt != "auto":
        cfg.data.format = fmt
    validate(cfg)
    report = prepare(cfg, overwrite=overwrite)
    paths = run_paths(run)
    print(f"prepared {report['counts']['train']} training and {report['counts']['eval']} evaluation examples "
          f"({report['format']}) into {paths.data_dir}")
    for row in report.get("sources") or []:
        print(f"  {row['source']}: {row['train']} training ({row['share']:.1%}), {row['eval']} evaluation examples")
    if report.get("files") and not report.get("sources"):
        shown = ', '.join(report['files'][:3]) + (', ...' if len(report['files']) > 3 else '')
        print(f"  read {len(report['files'])} files as one data set: {shown}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    return report


def preview(run: str, index: int | None = None, split: str = "train") -> str:
    """One prepared example as the model sees it, trained tokens shown between « and », and a mark where
    max_length cuts it.

    index None: the first of the run's own examples with the most answers (trained or weight-0 context), one
    that calls tools first when the data has any (the call and the answer are marked, the tool results and
    schemas are not), so every answer's span and stop token can be checked by eye. When the run's data has no
    multi-turn conversation, one borrowed from the sample data follows it, labelled as such. An example split
    off a conversation (templates that rewrite history) is headed by which assistant turn it trains.
    """
    paths = run_paths(run)
    cfg = load_config(paths.config)
    tokenizer, _ = tokenizer_with_template_flag(cfg)
    examples = read_examples(paths.train_data if split == "train" else paths.eval_data)
    if not examples:
        return f"(no {split} examples)"
    if index is not None:
        return _rendered(tokenizer, examples[index % len(examples)], cfg.train.max_length)
    best = _richest(examples)
    out = _rendered(tokenizer, examples[best], cfg.train.max_length)
    if _answers(examples[best]) < 2:  # show how a conversation is trained with a sample one, after the user's own
        sample = REPO_ROOT / "data" / "examples" / "socratic_dialogues.json"
        convs = split_examples_for(tokenizer, prepare_examples(str(sample), eval_fraction=0.0).train)
        out += (f"\n\n---- not your data: this run's data has no multi-turn conversation, so here is one from "
                f"{sample.name}, rendered with this run's template ----\n"
                + _rendered(tokenizer, convs[_richest(convs)], cfg.train.max_length))
    return out


def _answers(ex: dict) -> int:
    return sum(m["role"] == "assistant" for m in ex.get("messages") or [])  # weight-0 ones shown as context


def _richest(examples: list[dict]) -> int:
    """The first example with the most answers, a tool-calling one first when there is one."""
    def calls(ex):
        return any(m.get("tool_calls") for m in ex.get("messages") or [])

    return max(range(len(examples)), key=lambda i: (calls(examples[i]), _answers(examples[i]), -i))


def _rendered(tokenizer, example: dict, max_length: int) -> str:
    """The example's tokens as text, the trained runs between « and », a mark where max_length cuts it."""
    enc = encode_example(tokenizer, example, max_length)
    meta = example.get("metadata", {})
    head = ""
    if "turn" in meta:
        head = (f"(assistant turn {meta['turn']} of {meta['turns']} of a conversation the chat template rewrites; "
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
    return mark_cut("".join(out), enc["length"] > max_length, CUT_AT_MAX_LENGTH.format(n=max_length))
