"""Task scores: is an answer right? Each score compares one generated answer with its reference and gives a
value in [0, 1]; which scores a run uses is chosen from the references (or set with `eval.scores`).

    from lib.data.scores import choose_scores, score_answers
    names, why = choose_scores(references)                 # e.g. (["json", "json_keys"], "every reference is JSON ...")
    rows = score_answers(["json"], answers, references)    # {"json": [1.0, 0.0, None, ...]} (None: does not apply)

The scores (`TASK_SCORES`, lib/run/settings.py):
- `exact`: the answer equals the reference, case and whitespace aside; `contains`: the reference is inside it;
- `json`: the answer holds JSON (a ```json fenced block, or the first JSON value in it) equal to the
  reference's; `json_valid`: it holds JSON at all; `json_keys`: the share of the reference object's keys
  whose values the answer's object gets right (per-key accuracy);
- `number`: the final number of the answer (GSM8K's `#### n`, `\\boxed{n}`, else the last number; `1,000`
  is 1000) equals the reference's;
- `label`: the answer names the reference label (the one known label it names as a word, or all of it),
  for classifications: references that take few distinct values;
- `tool_call`: the answer's tool calls (lib/data/toolcalls.py) have the reference calls' names and arguments;
- the user's own scorer (`eval.scorer: "module:function"`, `resolve_scorer`), called as
  function(prediction, reference, record) and returning a number in [0, 1].
A score that does not apply to an example (a text reference for `tool_call`) is None there, and the
comparison counts only the examples it applies to.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from decimal import Decimal, InvalidOperation

from lib.data.toolcalls import _call_of, json_values, reference_name
from lib.run.errors import ConfigError, first_line
from lib.run.paths import REPO_ROOT
from lib.run.settings import TASK_SCORES

# A classification: at most this many distinct references, each at most LABEL_WORDS words, and every label
# seen at least twice on average (n >= 2 x distinct).
MAX_LABELS, LABEL_WORDS = 12, 4
SHORT_WORDS = 12  # references of at most this many words (median) get exact and contains
SHARE = 0.8  # a shape is chosen when at least this share of the references has it
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_BOXED = re.compile(r"\\boxed\s*\{")
_FRACTION = re.compile(r"(-?)\s*(?:\\d?frac\{(\d+)\}\{(\d+)\}|(\d+)\s*/\s*(\d+))")


def normalise(text) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes and punctuation removed."""
    text = " ".join(str(text or "").split()).casefold()
    return text.strip(" \t\"'`.,;:!?()[]{}«»“”‘’")


# ----------------------------------------------------------------------------- one answer, one reference


def score_exact(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def score_contains(answer: str, reference: str) -> float:
    ref = normalise(reference)
    return float(bool(ref) and ref in normalise(answer))


def parse_json(text: str):
    """The JSON an answer holds: a fenced block's content if it parses, else the first JSON value in it, else
    the whole text as JSON (a bare number or string); None when there is none."""
    for block in _FENCE.findall(text or ""):
        try:
            return json.loads(block)
        except ValueError:
            continue
    for value in json_values(text or ""):
        return value
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _same(a, b) -> bool:
    """JSON values equal, numbers by value (1 == 1.0), strings case and whitespace aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return normalise(a) == normalise(b)
    return a == b


def score_json(answer: str, reference: str) -> dict:
    """{"json_valid", "json", "json_keys"} of one answer (json_keys None when the reference is not an object)."""
    want, got = parse_json(reference), parse_json(answer)
    keys = None
    if isinstance(want, dict) and want:
        keys = (sum(isinstance(got, dict) and k in got and _same(got[k], v) for k, v in want.items()) / len(want))
    return {"json_valid": float(got is not None), "json": float(got is not None and _same(got, want)),
            "json_keys": keys}


def _as_number(text: str) -> Decimal | None:
    match = _NUMBER.findall(text or "")
    if not match:
        return None
    try:
        return Decimal(match[-1].replace(",", ""))
    except InvalidOperation:
        return None


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced)."""
    starts = [m.end() for m in _BOXED.finditer(text or "")]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1]:i - 1] if depth == 0 else None


def final_number(text: str) -> Decimal | None:
    """The answer's final number: after GSM8K's `####`, inside the last `\\boxed{}`, else the last number."""
    gsm = _GSM8K.findall(text or "")
    if gsm:
        return _as_number(gsm[-1])
    boxed = _boxed(text or "")
    if boxed is not None:
        frac = _FRACTION.fullmatch(boxed.strip())
        if frac:  # \frac{1}{2}, \dfrac{1}{2}, 1/2
            num, den = (Decimal(x) for x in (frac.group(2) or frac.group(4), frac.group(3) or frac.group(5)))
            return (-num if frac.group(1) else num) / den if den else None
        if _as_number(boxed) is not None:
            return _as_number(boxed)
    return _as_number(text)


def score_number(answer: str, reference: str) -> float | None:
    want = final_number(reference)
    if want is None:
        return None
    got = final_number(answer)
    return float(got is not None and got == want)


def score_label(answer: str, reference: str, labels: list[str]) -> float:
    """1.0 when the answer names the reference label: the answer is the label (case and punctuation aside),
    or the label is the only one of the known labels it names as a word."""
    got, want = normalise(answer), normalise(reference)
    if got == want:
        return 1.0
    named = [lab for lab in {normalise(x) for x in labels}
             if lab and re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", got)]
    return float(named == [want])


def _calls(text: str) -> list[dict]:
    """Every tool call in a text (a JSON list of calls counts as its calls), in order."""
    out, decoder, text, i = [], json.JSONDecoder(), text or "", 0
    while i < len(text):
        if text[i] not in "{[":
            i += 1
            continue
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        calls = [_call_of(item) for item in (value if isinstance(value, list) else [value])]
        out += [c for c in calls if c is not None]
        i = end if any(c is not None for c in calls) else i + 1  # a call's own arguments are not calls
    return out


def score_tool_call(answer: str, reference: str) -> float | None:
    """1.0 when the answer's calls are the reference's, names and arguments (in any order); None for a text
    reference."""
    if reference_name(reference) is None:
        return None
    want, got = _calls(reference), _calls(answer)[:len(_calls(reference)) or 1]
    key = lambda c: json.dumps(c, sort_keys=True, default=str)  # noqa: E731
    return float(len(got) == len(want) and sorted(map(key, got)) == sorted(map(key, want)))


# ----------------------------------------------------------------------------- many answers


def score_answers(names, answers: list[str], references: list[str]) -> dict[str, list]:
    """{score: [value or None per answer]} for the built-in scores `names`."""
    labels = sorted(set(references))
    out: dict[str, list] = {}
    for name in names:
        if name not in TASK_SCORES:
            raise ValueError(f"unknown task score {name!r} (the scores: {', '.join(TASK_SCORES)})")
        if name in ("json", "json_valid", "json_keys"):
            out[name] = [score_json(a, r)[name] for a, r in zip(answers, references)]
        elif name == "label":
            out[name] = [score_label(a, r, labels) for a, r in zip(answers, references)]
        else:
            fn = {"exact": score_exact, "contains": score_contains, "number": score_number,
                  "tool_call": score_tool_call}[name]
            out[name] = [fn(a, r) for a, r in zip(answers, references)]
    return out


def _words(text: str) -> int:
    return len(str(text or "").split())


def choose_scores(references: list[str]) -> tuple[list[str], str]:
    """The task scores that fit these references, and why, in words. Empty when none fits (free text:
    then only the text metrics compare the models, and the reason says how to add a score)."""
    refs = [r for r in references if isinstance(r, str)]
    n = len(refs)
    if not n:
        return [], "no eval references to score"
    calls = sum(reference_name(r) is not None for r in refs)
    if calls:
        return ["tool_call"], f"{calls} of {n} references are tool calls: the call's name and arguments are scored"
    if sum(isinstance(parse_json(r), (dict, list)) and r.strip()[:1] in "{[`" for r in refs) >= SHARE * n:
        return ["json", "json_valid", "json_keys"], "the references are JSON: parsed and compared, key by key"
    distinct = {normalise(r) for r in refs}
    if len(distinct) <= min(MAX_LABELS, n // 2) and max(map(_words, refs)) <= LABEL_WORDS:
        return ["label"], f"the references take {len(distinct)} distinct values: a classification, scored by label"
    numeric = sum(final_number(r) is not None and (_words(r) <= 3 or bool(_GSM8K.search(r) or _BOXED.search(r)))
                  for r in refs)
    if numeric >= SHARE * n:
        return ["number"], "the references end in a number (#### n, \\boxed{}, or a number alone): it is compared"
    if statistics.median(map(_words, refs)) <= SHORT_WORDS:
        return ["exact", "contains"], (f"the references are short (median {statistics.median(map(_words, refs)):g} "
                                       "words): exact match and containment")
    return [], ("the references are free text (median "
                f"{statistics.median(map(_words, refs)):g} words): no task score fits; BLEU and ROUGE-L compare the "
                "models, and eval.scores or eval.scorer (your own function) can add one")


# ----------------------------------------------------------------------------- the user's own scorer


def resolve_scorer(spec: str, root=REPO_ROOT):
    """The function `spec` ("module:function") names, imported from a Python file inside the project folder
    `root` only (a module found elsewhere, e.g. an installed package, is refused); ConfigError naming
    eval.scorer for a missing module or function, a file outside the project or a wrong signature."""
    import importlib
    import importlib.util
    import inspect
    import sys
    from pathlib import Path

    module_name, _, function = spec.partition(":")
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        found = importlib.util.find_spec(module_name.strip())
    except (ImportError, ValueError) as e:
        raise ConfigError(f"eval.scorer: cannot find module {module_name!r} ({first_line(e)})") from None
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    if origin is None or not origin.is_relative_to(root):
        where = "nowhere" if origin is None else str(origin)
        raise ConfigError(f"eval.scorer: module {module_name!r} must be a Python file in the project folder {root} "
                          f"(found {where})")
    try:
        fn = getattr(importlib.import_module(module_name.strip()), function.strip())
    except AttributeError:
        raise ConfigError(f"eval.scorer: {origin} has no function {function.strip()!r}") from None
    except Exception as e:  # the user's module failed to import: say so in one line
        raise ConfigError(f"eval.scorer: importing {origin} failed: {type(e).__name__}: {first_line(e)}") from None
    try:
        inspect.signature(fn).bind(None, None, None)
    except (TypeError, ValueError):
        raise ConfigError(f"eval.scorer: {spec} must take (prediction, reference, record)") from None
    return fn


def run_scorer(fn, spec: str, answers: list[str], references: list[str], records: list[dict]) -> list[float]:
    """The user's scorer on every answer; ConfigError naming eval.scorer and the example for a value that is
    not a number in [0, 1] or an exception it raises."""
    out = []
    for i, (a, r, rec) in enumerate(zip(answers, references, records)):
        try:
            value = fn(a, r, rec)
        except Exception as e:
            raise ConfigError(f"eval.scorer: {spec} raised {type(e).__name__} on eval example {i + 1}: "
                              f"{first_line(e)}") from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or value != value:
            raise ConfigError(f"eval.scorer: {spec} returned {value!r} for eval example {i + 1}; it must return "
                              "a number in [0, 1]")
        out.append(float(value))
    return out
