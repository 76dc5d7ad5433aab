"""The data audit: what training will see, measured with the run's own tokenizer before any weights load.

    from lib.data.audit import audit, audit_table
    report = audit(prepared, tokenizer, max_length=1024)   # data/report.json
    audit_table(report), fields_table(report), token_length_figure(report)   # notebook 01's views

Counts, token lengths and their histogram, what max_length cuts (and a length that fits 99%), the
trainable-token share, the end-of-turn token after every answer, system messages folded and
conversations split per turn by the chat template, special tokens' text in the data (encoded as text), empty and duplicate examples, pad vs eos, the
chat template, and where every field of the input went.
"""

from __future__ import annotations

import math

from lib.data.examples import Prepared
from lib.data.prompts import prompt_messages
from lib.data.scores import choose_scores
from lib.data.templates import TemplateError, end_of_turn_token, stop_token_ids
from lib.data.tokenization import encode_example
from lib.data.tokenization import split_for_template as split_for_turns
from lib.run.errors import DataError
from lib.run.figures import panel_figure, token_length_histogram


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


def split_for_template(prepared: Prepared, tokenizer, inline_reasoning: bool = False) -> int:
    """Split, in place, the conversations the chat template cannot train whole (it rewrites earlier
    turns, e.g. drops <think> blocks) into one example per assistant turn; returns how many were split.
    Reasoning in a separate field is rendered by the template, or inlined (data.inline_reasoning)."""
    n_split = 0
    for attr in ("train", "eval"):
        out = []
        for i, ex in enumerate(getattr(prepared, attr), start=1):
            try:
                parts = split_for_turns(tokenizer, ex, inline_reasoning)
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
        "control": sum(1 for e in enc_train + enc_eval if e["n_control_text"]),
        "control_tokens": sum(e["n_control_text"] for e in enc_train + enc_eval),
    }


def tool_counts(examples: list[dict], encoded: list[dict]) -> dict:
    """Tool calls and reasoning blocks in the trained assistant turns, tool results (context, never
    trained), and the share of the trained tokens in calls, in reasoning and in answers. Tool results
    of a conversation split per turn are counted once (in its last part)."""
    calls = results = reasoning = 0
    for ex in examples:
        msgs = ex.get("messages") or []
        meta = ex.get("metadata") or {}
        trained = [m for m in msgs if m["role"] == "assistant" and m.get("weight", 1) != 0]
        calls += sum(len(m.get("tool_calls") or []) for m in trained)
        reasoning += sum(1 for m in trained if m.get("reasoning_content") or "</think>" in (m.get("content") or ""))
        if meta.get("turn", 1) == meta.get("turns", 1):
            results += sum(m["role"] == "tool" for m in msgs)
    total = max(1, sum(e["n_trained"] for e in encoded))
    call = sum(e.get("n_trained_call", 0) for e in encoded) / total
    think = sum(e.get("n_trained_reasoning", 0) for e in encoded) / total
    return {"tool_calls": calls, "tool_results": results, "reasoning_blocks": reasoning,
            "trained_token_share": {"tool_calls": round(call, 4), "reasoning": round(think, 4),
                                    "answers": round(max(0.0, 1 - call - think), 4), "tool_results": 0.0}}


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
    if t["control"]:
        warnings.append(f"{t['control']} examples hold a special token's text (e.g. <|im_start|>, <s>) in their messages "
                        f"({t['control_tokens']} times): it is encoded as plain text, never as the control token")
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
        "template": {"system_folded_examples": t["folded"], "conversations_split_per_turn": n_split,
                     "control_token_text_examples": t["control"], "control_token_text_occurrences": t["control_tokens"]},
        "tools_and_reasoning": tool_counts(prepared.train, enc_train),
        "pad_token": pad, "eos_token": eos, "pad_distinct_from_eos": pad is not None and pad != eos,
        "chat_template_present": not template_added,
        "task_scores": task_scores_for(prepared.eval or prepared.train),
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
        ("special tokens written as text in the data (encoded as plain text)",
         f"{report['template'].get('control_token_text_examples', 0)} examples"),
        *_tool_rows(report.get("tools_and_reasoning")),
        ("pad token distinct from eos", f"{report['pad_distinct_from_eos']} (pad={report['pad_token']!r}, eos={report['eos_token']!r})"),
        ("chat template present", report["chat_template_present"]),
        *_score_rows(report.get("task_scores")),
        ("warnings", len(report["warnings"])),
    ]
    return pd.DataFrame(rows, columns=["check", "value"]).set_index("check")


def task_scores_for(examples: list[dict]) -> dict:
    """The task scores notebook 04 will use on these examples' answers (lib/data/scores.py), and why."""
    references = [ref for ex in examples if ex.get("messages")
                  for ref in [prompt_messages(ex["messages"])[1]] if ref is not None]
    names, why = choose_scores(references)
    return {"chosen": names, "why": why, "references": len(references)}


def _score_rows(ts: dict | None) -> list[tuple]:
    if not ts:
        return []
    chosen = ", ".join(ts["chosen"]) or "none (text metrics only)"
    return [("task scores for notebook 04 (eval.scores overrides)", f"{chosen}: {ts['why']}")]


def _tool_rows(tr: dict | None) -> list[tuple]:
    """The audit table's rows on tool calls and reasoning (none when the data has neither)."""
    if not tr or not (tr["tool_calls"] or tr["tool_results"] or tr["reasoning_blocks"]):
        return []
    share = tr["trained_token_share"]
    return [("tool calls / tool results / reasoning blocks",
             f"{tr['tool_calls']} / {tr['tool_results']} / {tr['reasoning_blocks']}"),
            ("trained tokens in tool calls / reasoning / answers (tool results: never)",
             f"{share['tool_calls']:.1%} / {share['reasoning']:.1%} / {share['answers']:.1%}")]


def fields_table(report: dict):
    """Where every field of the input went (pandas DataFrame): used as what, metadata, copy, ignored, unused."""
    import pandas as pd

    rows = [(f["field"], f["use"], f["records"], f["text_records"], f["example"]) for f in report.get("fields", [])]
    return pd.DataFrame(rows, columns=["field", "used as", "records", "with text", "example"]).set_index("field")


def token_length_figure(report: dict):
    """Histogram of tokens per training example with max_length marked (the panel notebook 05 draws too)."""
    return panel_figure("token_lengths", {"token_lengths": token_length_histogram(report)})
