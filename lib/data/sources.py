"""Several data sets in one run: each source read in its own shape, then mixed into one training split by weight.

    from lib.data.sources import prepare_data, source_rows
    prepared = prepare_data(cfg.data)          # one source: prepare_examples as ever; several: the mix
    rows = source_rows(prepared, tokenizer)    # per source: records, examples, tokens, trained tokens, share

The sources are `data.sources` (a list of {path, format, columns, ignore_fields, weight, eval_fraction};
`--data A --data B` makes it), or the one `data.path`. Each is normalised, accounted for and split into train and eval on its
own (prepare_examples), so each may have its own shape and column mapping, and the eval split keeps every
source (each source's own test split, or its held-out share). The training splits are then mixed by
`data.mix_strategy`, with the meaning of LLaMA-Factory's `mix_strategy` / `interleave_probs`:

* concat: every training example of every source once (weights are refused: they would change nothing);
* interleave_under: examples drawn by weight until the first source runs out (its share sets the size);
* interleave_over: drawn by weight until every source has run out at least once (the smaller repeated).

Draws are deterministic: each source's examples are shuffled with data.seed, then the next one comes from
the source furthest below its weight's share (a smooth weighted round robin), so every prefix of the
mixed split holds the shares the weights ask for. Each example's metadata names its source (`_source`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from lib.data.examples import Prepared, prepare_examples
from lib.run.errors import ConfigError, SFTError

SOURCE_KEYS = ("path", "format", "columns", "ignore_fields", "weight", "eval_fraction")
# interleave_over repeats the smaller sources; past this many times the records read, the mix is refused.
MAX_OVERSAMPLING = 20


def sources_of(d) -> list[dict] | None:
    """The sources of the data settings `d`, checked (ConfigError in one line), or None for the one data.path."""
    if not d.sources:
        if d.mix_weights:
            raise ConfigError("data.mix_weights needs several sources: give --data more than once, or data.sources")
        return None
    out = []
    for i, src in enumerate(d.sources, start=1):
        src = {"path": src} if isinstance(src, str) else src
        if not isinstance(src, dict) or not isinstance(src.get("path"), str) or not src["path"].strip():
            raise ConfigError(f"data.sources[{i}]: expected {{path: ..., format, columns, ignore_fields, weight}}, "
                              f"got {src!r}")
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"data.sources[{i}]: unknown key {unknown[0]!r} (keys: {', '.join(SOURCE_KEYS)})")
        out.append(dict(src))
    _weights(d, out)
    return out


def _weights(d, sources: list[dict]) -> list[float] | None:
    """The sources' weights (data.mix_weights, else their own `weight`s), or None when none is given."""
    weights = d.mix_weights
    if weights is not None and len(weights) != len(sources):
        raise ConfigError(f"data.mix_weights has {len(weights)} weights for {len(sources)} sources: give one a source")
    if weights is None and any(s.get("weight") is not None for s in sources):
        weights = [s.get("weight", 1) if s.get("weight") is not None else 1 for s in sources]
    if weights is None:
        return None
    out = []
    for i, w in enumerate(weights, start=1):
        try:  # `--set data.mix_weights=3,1` gives strings
            value = float(w) if isinstance(w, str) or (isinstance(w, (int, float)) and not isinstance(w, bool)) else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"data.mix_weights: weight {i} must be a number above 0, got {w!r}")
        out.append(value)
    return out


def strategy(d, weights) -> str:
    s = d.mix_strategy
    if s == "auto":
        return "interleave_under" if weights else "concat"
    if s == "concat" and weights:
        raise ConfigError("data.mix_strategy=concat keeps every record once, so data.mix_weights would change "
                          "nothing: use interleave_under or interleave_over, or drop the weights")
    return s


def _label(src: dict, i: int, taken: set) -> str:
    name = Path(src["path"]).name or src["path"]
    label = name if name not in taken else f"{name} ({i})"
    taken.add(label)
    return label


def prepare_data(d) -> Prepared:
    """The examples of the run's data: one source as prepare_examples reads it, or several mixed."""
    sources = sources_of(d)
    if sources is None:
        return prepare_examples(d.path, d.format, d.eval_fraction, d.seed, d.max_examples, d.system_prompt,
                                d.columns, d.ignore_fields)
    weights = _weights(d, sources)
    how = strategy(d, weights)
    parts, taken = [], set()
    for i, src in enumerate(sources, start=1):
        label = _label(src, i, taken)
        try:
            share = src.get("eval_fraction", d.eval_fraction)
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
                raise ConfigError(f"data.sources[{i}].eval_fraction: must be in [0, 1), got {share!r}")
            p = prepare_examples(src["path"], src.get("format") or "auto", share, d.seed, None,
                                 d.system_prompt, src.get("columns"), src.get("ignore_fields") or ())
        except SFTError as e:
            raise SFTError(f"data source {i} ({label}): {e}") from None
        src["format"] = p.format
        for ex in p.train + p.eval:
            ex.setdefault("metadata", {})["_source"] = label
        parts.append((label, p))
    train = mix([p.train for _, p in parts], weights, how, d.seed)
    if d.max_examples is not None:
        train = train[:d.max_examples]
    d.sources = sources  # each with the format it was read as: config.yaml says how to read it again
    d.path = " + ".join(s["path"] for s in sources)  # what the model card and the summary name
    return _combined(parts, train, weights, how)


def mix(trains: list[list[dict]], weights: list[float] | None, how: str, seed: int) -> list[dict]:
    """The training splits of the sources mixed by `how` (see the module docstring)."""
    if how == "concat":
        return [ex for t in trains for ex in t]
    pools = []
    for i, t in enumerate(trains):
        order = list(range(len(t)))
        random.Random(f"{seed}:{i}").shuffle(order)
        pools.append([t[j] for j in order])
    total_w = sum(weights)
    need = [len(p) * total_w / w for p, w in zip(pools, weights)]  # draws until each source runs out
    size = math.floor(min(need)) if how == "interleave_under" else math.ceil(max(need))
    if how == "interleave_over" and size > MAX_OVERSAMPLING * sum(len(p) for p in pools):
        raise ConfigError(f"data.mix_strategy=interleave_over would repeat the smaller sources into {size} examples "
                          f"(over {MAX_OVERSAMPLING} times the records): use interleave_under, or weights nearer "
                          "the sources' sizes")
    counts, out = [0] * len(pools), []
    for t in range(1, size + 1):
        i = max(range(len(pools)), key=lambda k: weights[k] * t / total_w - counts[k])
        out.append(pools[i][counts[i] % len(pools[i])])
        counts[i] += 1
    return out


def _combined(parts: list, train: list[dict], weights, how: str) -> Prepared:
    labels = [label for label, _ in parts]
    notes = [f"{how} mix of {len(parts)} sources ({', '.join(labels)})"
             + (f" with weights {', '.join(f'{w:g}' for w in weights)}" if weights else "")]
    fields = []
    for label, p in parts:
        notes += [f"{label}: {n}" for n in p.notes]
        fields += [dict(row, field=f"{label}: {row['field']}") for row in p.fields]
    sources = [{"source": label, "path": p.source, "format": p.format, "examples": len(p.train) + len(p.eval),
                "weight": weights[i] if weights else None} for i, (label, p) in enumerate(parts)]
    return Prepared(train, [ex for _, p in parts for ex in p.eval], "+".join(p.format for _, p in parts),
                    " + ".join(p.source for _, p in parts), "mixed",
                    "; ".join(f"{label}: {p.eval_from}" for label, p in parts),
                    sum(p.dropped_empty for _, p in parts), sum(p.duplicates for _, p in parts), notes, fields,
                    sum(p.weight0_answers for _, p in parts), [f for _, p in parts for f in (p.files or [p.source])],
                    sources)


def source_rows(prepared: Prepared, tokenizer, max_length: int | None = None) -> list[dict] | None:
    """Per source of a mix: its format, examples in train and eval, training tokens, trained tokens, and its
    share of the training split (examples and trained tokens) beside the share its weight asks for."""
    sources = prepared.sources
    if not sources:
        return None
    from lib.data.tokenization import IGNORE_INDEX, encode_example

    rows = {s["source"]: dict(s, train=0, eval=0, tokens=0, trained_tokens=0) for s in sources}
    for split in ("train", "eval"):
        for ex in getattr(prepared, split):
            row = rows[ex["metadata"]["_source"]]
            row[split] += 1
            if split == "train":
                enc = encode_example(tokenizer, ex, max_length)
                row["tokens"] += len(enc["input_ids"])
                row["trained_tokens"] += sum(lab != IGNORE_INDEX for lab in enc["labels"])
    n = sum(r["train"] for r in rows.values()) or 1
    t = sum(r["trained_tokens"] for r in rows.values()) or 1
    total_w = sum(r["weight"] for r in rows.values() if r["weight"]) or None
    for r in rows.values():
        r["share"] = round(r["train"] / n, 4)
        r["trained_token_share"] = round(r["trained_tokens"] / t, 4)
        r["target_share"] = round(r["weight"] / total_w, 4) if total_w and r["weight"] else None
    return list(rows.values())


def sources_table(report: dict):
    """data/report.json's sources as a table (pandas DataFrame) for notebook 01; a one-line note for one source."""
    import pandas as pd

    rows = report.get("sources")
    if not rows:
        return pd.DataFrame([{"sources": f"one data set: {report.get('source')}"}]).set_index("sources")
    cols = ["source", "format", "weight", "target_share", "share", "train", "eval", "tokens", "trained_tokens",
            "trained_token_share"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows]).set_index("source")
