"""Did it help? The task scores on real-shaped answers, the paired bootstrap's coverage, the verdicts,
eval/verdict.json from a real evaluation, the null control, and the user's own scorer."""

from __future__ import annotations

import json
import random

import pytest

from lib.data.scores import (
    choose_scores,
    final_number,
    parse_json,
    resolve_scorer,
    run_scorer,
    score_answers,
    score_json,
    score_label,
    score_number,
    score_tool_call,
)
from lib.evaluate.verdict import (
    MIN_PAIRS,
    decide,
    paired_bootstrap,
    perplexity_row,
    score_row,
    verdict_sentence,
)
from lib.run.errors import ConfigError

# ----------------------------------------------------------------------------- each score


def test_json_with_text_around_it_or_in_a_fence():
    ref = '{"name": "Bela Silva", "age": 25, "city": "Split", "job": "nurse"}'
    fenced = 'Here it is:\n```json\n{"name": "Bela Silva", "age": 25.0, "city": "split", "job": "nurse"}\n```\nDone.'
    assert score_json(fenced, ref) == {"json_valid": 1.0, "json": 1.0, "json_keys": 1.0}
    around = 'Sure! {"name": "Laura", "age": 25, "city": "Sinelabra", "job": "nurse"} hope that helps'
    assert score_json(around, ref) == {"json_valid": 1.0, "json": 0.0, "json_keys": 0.5}
    assert score_json('{"name": "Bela Silva", "age": 25', ref) == {"json_valid": 0.0, "json": 0.0, "json_keys": 0.0}
    assert parse_json("no json here") is None
    assert score_json('{"a": [1, 2]}', '{"a": [2, 1]}')["json"] == 0.0  # order of a list matters
    assert score_json('{"ok": true}', '{"ok": 1}')["json"] == 0.0  # true is not 1


@pytest.mark.parametrize("text, value", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"), ("The answer is \\boxed{42}.", "42"),
    ("It costs 1,000 dollars", "1000"), ("so -3.5 is it", "-3.5"), ("\\boxed{\\frac{1}{2}} or 7", "0.5"), ("\\boxed{3/4}", "0.75"), ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("#### 1,234,567", "1234567"), ("no number", None), ("\\boxed{x+{y}} then 5", "5")])
def test_the_final_number(text, value):
    from decimal import Decimal

    assert final_number(text) == (None if value is None else Decimal(value))


def test_number_scores_by_value():
    assert score_number("so the total is 1,000.", "#### 1000") == 1.0
    assert score_number("\\boxed{12}", "The answer is 12") == 1.0
    assert score_number("13", "12") == 0.0
    assert score_number("no idea", "12") == 0.0
    assert score_number("12", "no number at all") is None


def test_labels_with_case_and_punctuation():
    labels = ["positive", "negative", "neutral"]
    assert score_label("Positive.", "positive", labels) == 1.0
    assert score_label("The sentiment is NEGATIVE!", "negative", labels) == 1.0
    assert score_label("positive or negative", "positive", labels) == 0.0  # names two labels: not an answer
    assert score_label("neutral", "positive", labels) == 0.0


def test_tool_calls_in_the_formats_toolcalls_reads():
    ref = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}])
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}\n</tool_call>'
    openai = '{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}}'
    assert score_tool_call(hermes, ref) == 1.0
    assert score_tool_call(openai, ref) == 1.0
    assert score_tool_call('{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}', ref) == 0.0
    assert score_tool_call("It is sunny.", ref) == 0.0
    assert score_tool_call("anything", "a text answer") is None
    two = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    assert score_tool_call('[{"name": "b", "arguments": {"x": 1}}, {"name": "a", "arguments": {}}]', two) == 1.0
    assert score_tool_call('{"name": "a", "arguments": {}}', two) == 0.0


def test_exact_and_contains():
    got = score_answers(["exact", "contains"], ["  Paris. ", "It is Paris, France", "Lyon"], ["paris", "Paris", "Paris"])
    assert got == {"exact": [1.0, 0.0, 0.0], "contains": [1.0, 1.0, 0.0]}


def test_scores_are_chosen_from_the_references():
    assert choose_scores(['{"a": 1}', '{"a": 2}', '{"b": 3}'])[0] == ["json", "json_valid", "json_keys"]
    assert choose_scores(["positive", "negative"] * 6)[0] == ["label"]
    assert choose_scores([f"Step one... #### {i}" for i in range(10)])[0] == ["number"]
    assert choose_scores([f"{i * 7}" for i in range(10)])[0] == ["number"]
    assert choose_scores([f"the city of town {i}" for i in range(10)])[0] == ["exact", "contains"]
    names, why = choose_scores(["Why do you think leaves fall? What changes in autumn light and warmth? " * 2] * 5)
    assert names == [] and "eval.scorer" in why
    call = json.dumps([{"name": "f", "arguments": {}}])
    assert choose_scores([call, "text"])[0] == ["tool_call"]


# ----------------------------------------------------------------------------- the bootstrap and the verdicts


def test_a_known_difference_lies_inside_the_interval_about_95_percent_of_the_time():
    """200 seeds of paired data with a true mean difference of 0.15 (correlated pairs, 40 prompts)."""
    covered, better = 0, 0
    for seed in range(200):
        rng = random.Random(seed)
        skill = [rng.random() for _ in range(40)]
        base = [float(rng.random() < s * 0.6) for s in skill]
        tuned = [float(rng.random() < s * 0.6 + 0.15) for s in skill]
        diff, (low, high) = paired_bootstrap(base, tuned, resamples=1000, seed=seed)
        covered += low <= 0.15 <= high
        better += decide((low, high), 40, True) == "better"
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_a_zero_difference_gives_no_detectable_change_in_at_least_95_percent():
    quiet = 0
    for seed in range(200):
        rng = random.Random(1000 + seed)
        skill = [rng.random() for _ in range(30)]
        base = [float(rng.random() < s) for s in skill]
        tuned = [float(rng.random() < s) for s in skill]
        _, ci = paired_bootstrap(base, tuned, resamples=1000, seed=seed)
        quiet += decide(ci, 30, True) == "no detectable change"
    assert quiet / 200 >= 0.93, quiet  # the percentile bootstrap runs a little narrow at n=30


def test_too_few_prompts_to_tell():
    assert MIN_PAIRS == 6 and 2 * 0.5 ** (MIN_PAIRS - 1) > 0.05 >= 2 * 0.5 ** MIN_PAIRS  # the sign test
    row = score_row("exact", [0.0] * 5, [1.0] * 5)
    assert row["verdict"] == "too few prompts to tell" and row["n"] == 5
    row = score_row("exact", [0.0] * 6, [1.0] * 6)
    assert row["verdict"] == "better" and row["ci95"] == [1.0, 1.0]
    row = score_row("exact", [1.0] * 8 + [None], [0.0] * 8 + [1.0])
    assert row["verdict"] == "worse" and row["n"] == 8  # None: the score does not apply there


def test_perplexity_row_is_paired_and_lower_is_better():
    base = [[2.0 * t, t] for t in (5, 8, 13, 4, 9, 10, 7)]
    tuned = [[1.0 * t, t] for t in (5, 8, 13, 4, 9, 10, 7)]
    row = perplexity_row({"base": base, "tuned": tuned})
    assert row["base"] == pytest.approx(2.718281828 ** 2) and row["tuned"] == pytest.approx(2.718281828)
    assert row["verdict"] == "better" and row["ci95"][1] < 0


def test_the_sentence_leads_with_the_task_score_and_says_n():
    rows = [score_row("json", [0.0] * 20 + [1.0] * 10, [1.0] * 28 + [0.0] * 2)]
    s = verdict_sentence(rows)
    assert s.startswith("Fine-tuning helped on your task: JSON equal to the reference 33% -> 93%")
    assert "over 30 eval prompts" in s


# ----------------------------------------------------------------------------- the user's own scorer


def test_the_users_scorer_is_resolved_inside_the_project_only(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def good(prediction, reference, record):\n    return float(prediction.strip() == reference)\n"
        "def two(prediction, reference):\n    return 1.0\n"
        "def wild(prediction, reference, record):\n    return 1.5\n"
        "def boom(prediction, reference, record):\n    return record['answer']\n")
    fn = resolve_scorer("my_scores:good", root=tmp_path)
    assert run_scorer(fn, "my_scores:good", ["a ", "b"], ["a", "c"], [{}, {}]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"^eval.scorer: my_scores:two must take \(prediction, reference, record\)"):
        resolve_scorer("my_scores:two", root=tmp_path)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        resolve_scorer("my_scores:nope", root=tmp_path)
    with pytest.raises(ConfigError, match="cannot find module|must be a Python file in the project folder"):
        resolve_scorer("no_such_module_here:f", root=tmp_path)
    with pytest.raises(ConfigError, match="must be a Python file in the project folder"):
        resolve_scorer("json:dumps", root=tmp_path)  # the standard library is not the user's project
    with pytest.raises(ConfigError, match=r"returned 1.5 for eval example 1; it must return a number in \[0, 1\]"):
        run_scorer(resolve_scorer("my_scores:wild", root=tmp_path), "my_scores:wild", ["a"], ["a"], [{}])
    with pytest.raises(ConfigError, match="raised KeyError on eval example 2"):
        run_scorer(resolve_scorer("my_scores:boom", root=tmp_path), "my_scores:boom", ["a", "b"], ["a", "b"],
                   [{"answer": 1.0}, {}])


@pytest.mark.parametrize("value, message", [
    ("[exact, bleu]", "eval.scores: unknown score 'bleu'"),
    ("[exact, 3]", "eval.scores: every entry must be a non-empty string"),
    ("[1, 2]", "eval.scores: every entry must be a non-empty string"),
])
def test_bad_eval_scores_are_one_line_naming_the_key(value, message):
    from lib.run.config import apply_overrides, make_config

    with pytest.raises(ConfigError, match=message):
        apply_overrides(make_config("tiny"), [f"eval.scores={value}"])


def test_an_eval_score_that_fits_no_reference_is_said_not_dropped():
    """eval.scores=[exact, number] on references without a number: number has no row, and the stage says so
    (a warning, and the reason kept in verdict.json's `why`) instead of leaving it out silently."""
    from lib.evaluate.verdict import task_scores, verdict_rows
    from lib.run.config import apply_overrides, make_config

    cfg = apply_overrides(make_config("tiny"), ["eval.scores=[exact, number]"])
    refs = ["Why does ice float?", "What makes the sky blue?"]
    answers = {m: [{"text": t, "stopped": True} for t in ("Why does ice float?", "no")] for m in ("base", "tuned")}
    with pytest.warns(UserWarning, match=r"^eval\.scores: number fits none of the 2 eval references"):
        scored = task_scores(cfg, answers, refs, [{}, {}])
    assert scored["names"] == ["exact", "number"] and "number fits none" in scored["why"]
    assert [r["metric"] for r in verdict_rows(scored) if r["kind"] == "task"] == ["exact"]


def test_a_bad_eval_scorer_is_one_line_naming_the_key():
    from lib.run.config import apply_overrides, make_config

    assert apply_overrides(make_config("tiny"), ["eval.scores=exact"]).eval.scores == ["exact"]  # one name: a list

    with pytest.raises(ConfigError, match="eval.scorer: expected 'module:function'"):
        apply_overrides(make_config("tiny"), ["eval.scorer=justaname"])


# ----------------------------------------------------------------------------- a real evaluation


def test_evaluate_writes_the_verdict_and_a_null_control_that_shows_no_change(trained_run):
    """The tiny model trained, then evaluated with exact and contains (its references are free text, so
    none is chosen by itself): eval/verdict.json has the rows the contract names, each prediction its
    per-model scores, and the null control (LoRA B zeroed: the base through the adapter) no detectable change."""
    from conftest import copy_run

    from lib.evaluate.evaluation import run_evaluate
    from lib.evaluate.verdict import verdict_line, verdict_table
    from lib.run.paths import run_paths
    from lib.run.rundir import read_json

    run = copy_run(trained_run, "verdict")
    result = run_evaluate(run, overrides=["eval.scores=[exact, contains]", "eval.generate_examples=8",
                                          "generation.max_new_tokens=12"], progress=False, null_control=True)
    paths = run_paths(run)
    verdict = read_json(paths.verdict)
    assert verdict == json.loads(json.dumps(result["verdict"]))
    metrics = [r["metric"] for r in verdict["rows"]]
    assert metrics[:2] == ["exact", "contains"] and "perplexity" in metrics and "stop_rate" in metrics
    keys = {"metric", "higher_is_better", "base", "tuned", "difference", "ci95", "n", "verdict"}
    n = len(result["predictions"])
    assert n == 8
    for row in verdict["rows"]:
        assert keys <= set(row), row
        if row["kind"] in ("task", "text"):
            assert row["n"] == n and row["ci95"][0] <= row["difference"] <= row["ci95"][1]
    ppl = next(r for r in verdict["rows"] if r["metric"] == "perplexity")
    assert ppl["base"] == pytest.approx(result["perplexity"]["base"]["perplexity"])
    assert ppl["tuned"] == pytest.approx(result["perplexity"]["tuned"]["perplexity"])
    first = result["predictions"][0]
    assert first["scores"]["tuned"]["exact"] == float(first["tuned"].strip().casefold().strip(".?!") ==
                                                       first["reference"].strip().casefold().strip(".?!"))
    control = read_json(paths.null_control)
    task = [r for r in control["rows"] if r["kind"] == "task"]
    assert [r["metric"] for r in task] == ["exact", "contains"]
    assert all(r["verdict"] == "no detectable change" and r["difference"] == 0 for r in task), task
    assert control["sentence"].startswith("The null control")
    assert verdict_table(run).shape[0] == len(verdict["rows"])
    assert verdict_line(run).startswith(verdict["sentence"])
