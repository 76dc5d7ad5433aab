"""Data preparation: every format and container, the split, the audit, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.__main__ import main
from lib.data.examples import prepare_examples
from lib.data.prepare import run_prepare
from lib.data.readers import load_records, read_examples
from lib.run.errors import DataError
from lib.run.paths import run_paths

EX = Path(__file__).resolve().parent.parent / "data" / "examples"

# file -> (format, number of records)
SAMPLES = {
    "socratic_questions.jsonl": ("socratic", None),
    "socratic_dialogues.json": ("messages", 12),
    "qa_splits.json": ("qa_splits", 21),
    "instruction_output_zh.json": ("instruction_output", 12),
    "alpaca_instruction_response.jsonl": ("instruction_response", 12),
    "instruction_output.csv": ("instruction_output", 10),
    "sharegpt_conversations.jsonl": ("sharegpt", 8),
    "prompt_completion.jsonl": ("prompt_completion", 10),
    "plain_text.jsonl": ("text", 10),
    "messages.parquet": ("messages", 6),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_format_is_detected_and_normalised(name):
    fmt, n = SAMPLES[name]
    p = prepare_examples(str(EX / name))
    assert p.format == fmt
    examples = p.train + p.eval
    if n is not None:
        assert len(examples) == n
    for ex in examples:
        if fmt == "text":
            assert set(ex) == {"text", "metadata"} and ex["text"].strip()
        else:
            roles = [m["role"] for m in ex["messages"]]
            assert "assistant" in roles and set(roles) <= {"system", "user", "assistant"}
            assert all(isinstance(m["content"], str) for m in ex["messages"])


def test_socratic_questions_become_one_answer():
    first = json.loads((EX / "socratic_questions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    p = prepare_examples(str(EX / "socratic_questions.jsonl"), eval_fraction=0.0)
    ex = p.train[0]
    assert ex["messages"] == [{"role": "user", "content": first["instruction"]},
                              {"role": "assistant", "content": "\n".join(first["output"])}]
    assert ex["metadata"] == {"line": 1}


def test_qa_file_keeps_its_test_split_as_eval():
    raw = json.loads((EX / "qa_splits.json").read_text(encoding="utf-8"))
    p = prepare_examples(str(EX / "qa_splits.json"), eval_fraction=0.5)
    assert len(p.train) == len(raw["train"]) and len(p.eval) == len(raw["test"])
    assert p.eval[0]["messages"][0]["content"] == raw["test"][0]["Question"]
    assert p.eval[0]["messages"][1]["content"] == raw["test"][0]["Answer"]
    assert "test" in p.eval_from


def test_messages_keep_extra_fields_as_metadata():
    p = prepare_examples(str(EX / "socratic_dialogues.json"), eval_fraction=0.0)
    assert all(ex["metadata"]["instance_id"].startswith("dlg-") for ex in p.train)


def test_alpaca_input_joins_the_instruction():
    rows = [json.loads(x) for x in (EX / "alpaca_instruction_response.jsonl").read_text(encoding="utf-8").splitlines()]
    with_input = next(r for r in rows if r["input"])
    p = prepare_examples(str(EX / "alpaca_instruction_response.jsonl"), eval_fraction=0.0)
    ex = next(e for e in p.train if e["messages"][1]["content"] == with_input["response"])
    assert ex["messages"][0]["content"] == f"{with_input['instruction']}\n\n{with_input['input']}"


def test_split_is_seeded_and_disjoint():
    a = prepare_examples(str(EX / "socratic_questions.jsonl"), eval_fraction=0.2, seed=1)
    b = prepare_examples(str(EX / "socratic_questions.jsonl"), eval_fraction=0.2, seed=1)
    c = prepare_examples(str(EX / "socratic_questions.jsonl"), eval_fraction=0.2, seed=2)
    assert a.eval == b.eval and a.eval != c.eval
    key = lambda e: e["metadata"]["line"]  # noqa: E731
    assert not {key(e) for e in a.train} & {key(e) for e in a.eval}
    assert len(a.eval) == round(0.2 * (len(a.train) + len(a.eval)))


def test_unicode_survives_the_round_trip(outputs):
    raw = json.loads((EX / "instruction_output_zh.json").read_text(encoding="utf-8"))
    run_prepare("zh", str(EX / "instruction_output_zh.json"), overrides=["data.eval_fraction=0"])
    paths = run_paths("zh")
    text = paths.train_data.read_text(encoding="utf-8")
    assert "\\u" not in text  # written as UTF-8, not escaped
    got = {e["messages"][1]["content"] for e in read_examples(paths.train_data)}
    assert got == {r["output"] for r in raw}


# ----------------------------------------------------------------------------- containers

def _socratic_rows():
    return [json.loads(x) for x in (EX / "socratic_questions.jsonl").read_text(encoding="utf-8").splitlines()][:20]


@pytest.mark.parametrize("container", ["json", "jsonl", "csv", "parquet", "save_to_disk"])
def test_every_container_gives_the_same_examples(tmp_path, container):
    rows = [{"instruction": r["instruction"], "output": " ".join(r["output"])} for r in _socratic_rows()]
    if container == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif container == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    elif container == "csv":
        import pandas as pd

        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif container == "parquet":
        import pandas as pd

        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    else:
        from datasets import Dataset, DatasetDict

        path = tmp_path / "folder"
        DatasetDict({"train": Dataset.from_list(rows[:15]), "test": Dataset.from_list(rows[15:])}).save_to_disk(str(path))
    p = prepare_examples(str(path), eval_fraction=0.0)
    assert p.format == "instruction_output"
    got = [(e["messages"][0]["content"], e["messages"][1]["content"]) for e in p.train + p.eval]
    assert sorted(got) == sorted((r["instruction"], r["output"]) for r in rows)
    if container == "save_to_disk":
        assert len(p.eval) == 5  # the folder's test split is kept


QA = [{"Question": f"Question {i}?", "Answer": f"Why {i}?"} for i in range(12)]


def _qa_data(container: str, splits: dict, tmp_path: Path, monkeypatch) -> str:
    """The Question/Answer rows of `splits` ({"train": rows, ...}) in a container with those splits."""
    if container == "json":
        path = tmp_path / "qa.json"
        path.write_text(json.dumps(splits), encoding="utf-8")
        return str(path)
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()})
    if container == "save_to_disk":
        dd.save_to_disk(str(tmp_path / "folder"))
        return str(tmp_path / "folder")
    import datasets  # the Hub: no network in tests, so load_dataset hands back the DatasetDict it would build

    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: dd)
    return "someone/qa-dataset"


@pytest.mark.parametrize("container", ["json", "save_to_disk", "hub"])
def test_validation_split_is_kept_for_evaluation_never_trained_on(container, tmp_path, monkeypatch):
    splits = {"train": QA[:6], "validation": QA[6:9], "test": QA[9:]}
    p = prepare_examples(_qa_data(container, splits, tmp_path, monkeypatch))
    questions = {split: [r["Question"] for r in rows] for split, rows in splits.items()}
    assert [e["messages"][0]["content"] for e in p.train] == questions["train"]
    assert sorted(e["messages"][0]["content"] for e in p.eval) == sorted(questions["validation"] + questions["test"])
    assert "'validation'" in p.eval_from and "'test'" in p.eval_from
    assert any("validation" in n and "none is trained on" in n for n in p.notes)


@pytest.mark.parametrize("container", ["json", "save_to_disk", "hub"])
def test_a_split_that_is_neither_train_nor_eval_is_left_out(container, tmp_path, monkeypatch):
    splits = {"train": QA[:6], "unsupervised": QA[6:9], "test": QA[9:]}
    p = prepare_examples(_qa_data(container, splits, tmp_path, monkeypatch))
    assert [e["messages"][0]["content"] for e in p.train] == [r["Question"] for r in QA[:6]]
    assert [e["messages"][0]["content"] for e in p.eval] == [r["Question"] for r in QA[9:]]
    assert any("split 'unsupervised' (3 records) is left out" in n for n in p.notes)


def test_split_notes_reach_the_audit(tmp_path, outputs):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"train": QA[:6], "validation": QA[6:9], "test": QA[9:]}), encoding="utf-8")
    report = run_prepare("splits", str(path))
    assert report["counts"] == {"train": 6, "eval": 6, "dropped_empty": 0, "duplicates": 0, "weight0_answers": 0}
    assert report["eval_from"] == "the 'validation' and 'test' splits of the data"
    assert any("2 evaluation splits (validation, test)" in w for w in report["warnings"])
    trained = read_examples(run_paths("splits").train_data)
    assert [e["messages"][0]["content"] for e in trained] == [r["Question"] for r in QA[:6]]


def test_text_parts_are_joined(tmp_path):
    rows = [{"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Ask questions."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why does ice float?"},
                                     {"type": "text", "text": "Explain briefly."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "What happens to water when it freezes?"}]}]},
        {"messages": [{"role": "user", "content": "Plain string content"},
                      {"role": "assistant", "content": [{"type": "text", "text": "Still fine?"}]}]}]
    path = tmp_path / "parts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    p = prepare_examples(str(path), eval_fraction=0.0)
    assert [e["messages"] for e in p.train] == [
        [{"role": "system", "content": "Ask questions."},
         {"role": "user", "content": "Why does ice float?\nExplain briefly."},
         {"role": "assistant", "content": "What happens to water when it freezes?"}],
        [{"role": "user", "content": "Plain string content"}, {"role": "assistant", "content": "Still fine?"}]]


def test_format_can_be_forced(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Why?", "output": "Because.", "text": "other"}) + "\n", encoding="utf-8")
    # a text field beside instruction/output that is no rendering of them: used by nothing, so refused ...
    with pytest.raises(DataError, match="field 'text': holds text in 1 of 1 records and nothing uses it"):
        prepare_examples(str(path), eval_fraction=0)
    # ... until the user says what it is: ignored, or the format that trains it
    assert prepare_examples(str(path), eval_fraction=0, ignore_fields=["text"]).format == "instruction_output"
    forced = prepare_examples(str(path), fmt="text", eval_fraction=0, ignore_fields=["instruction", "output"])
    assert forced.train[0]["text"] == "other"


def test_hub_id_that_cannot_be_loaded_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded as a Hugging Face Hub dataset"):
        load_records("no-such-owner/no-such-dataset-xyz")


# ----------------------------------------------------------------------------- bad input

BAD = {
    # name: (file name, content (str or bytes), expected message parts)
    "invalid_json_line": ("x.jsonl", '{"instruction": "a", "output": ["b?"]}\n{"instruction": "c" "output": 1}\n',
                          ["x.jsonl: line 2: invalid JSON", "delimiter"]),
    "empty_file": ("x.jsonl", "", ["x.jsonl: the file is empty"]),
    "unknown_fields": ("x.jsonl", '{"foo": 1, "bar": 2}\n', ["x.jsonl: line 1:", "bar, foo match no known format",
                                                            "socratic", "messages", "prompt_completion"]),
    "missing_answer": ("x.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d", "output": null}\n',
                       ["x.jsonl: line 2: field 'output': missing answer"]),
    "answer_wrong_type": ("x.json", '[{"instruction": "a", "response": "b"}, {"instruction": "c", "response": 5}]',
                          ["x.json: record 2: field 'response': expected a string, got a number"]),
    "empty_question_list": ("x.jsonl", '{"instruction": "a", "output": ["b?"]}\n\n{"instruction": "c", "output": []}\n',
                            ["x.jsonl: line 3: field 'output': the list of questions is empty"]),
    "question_not_string": ("x.jsonl", '{"instruction": "a", "output": ["b?", 3]}\n',
                            ["x.jsonl: line 1: field 'output[2]': question 2 is a number"]),
    "no_assistant_turn": ("x.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
                          ["x.jsonl: line 1: field 'messages': the conversation has no assistant turn"]),
    "bad_role": ("x.jsonl", '{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
                 ["x.jsonl: line 1: field 'messages[1].role': unknown role 'human'"]),
    "binary_file": ("x.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["x.jsonl: this is a binary file"]),
    "not_utf8": ("x.jsonl", '{"instruction": "a", "output": ["b?"]}\n{"instruction": "caf\xe9", "output": ["x?"]}\n'.encode("latin-1"),
                 ["x.jsonl: line 2: not valid UTF-8"]),
    "qa_missing_answer": ("x.json", '{"train": [{"Question": "q"}], "test": []}', ["split 'train': record 1: field 'Answer': missing answer"]),
    "json_syntax": ("x.json", '[{"instruction": "a",\n "output": ["b?"]},\n {"instruction" "c"}]', ["x.json: line 3: invalid JSON"]),
    "not_objects": ("x.json", '[1, 2]', ["x.json: record 1: expected a JSON object"]),
    "only_a_question": ("x.jsonl", '{"instruction": "a", "input": "b"}\n', ["line 1: field 'output': missing answer"]),
    "unsupported_type": ("x.txt", "hello", ["x.txt: unsupported file type '.txt'"]),
    # A quote never closed: the default csv reader swallowed the rest of the file into one answer.
    "csv_unterminated_quote": ("x.csv", 'instruction,output\na,b\nc,"d\ne,f\ng,h\n',
                               ["x.csv: line 3: unterminated quoted field"]),
    "csv_unterminated_second_field": ("x.csv", 'instruction,output\n"a\nb",c\n"d\ne","f\ng,h\n',
                                      ["x.csv: line 5: unterminated quoted field"]),
    "csv_text_after_quote": ("x.csv", 'instruction,output\na,b\nc,"d"e\n', ["x.csv: line 3: invalid CSV"]),
    "image_part": ("x.jsonl", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": "What do you see?"}]}) + "\n",
        ["x.jsonl: line 1: field 'messages[1].content[2]': a content part of type 'image_url'"]),
    "empty_parts": ("x.jsonl", json.dumps({"messages": [{"role": "user", "content": []},
                                                        {"role": "assistant", "content": "Why?"}]}) + "\n",
                    ["x.jsonl: line 1: field 'messages[1].content': the list of content parts is empty"]),
    "part_without_text": ("x.json", json.dumps([{"conversations": [
        {"from": "human", "value": [{"type": "text", "text": 3}]}, {"from": "gpt", "value": "Why?"}]}]),
        ["x.json: record 1: field 'conversations[1].value[1].text': expected a string, got a number"]),
    "no_train_split": ("x.json", json.dumps({"first": [{"Question": "q", "Answer": "a"}],
                                             "second": [{"Question": "q2", "Answer": "a2"}],
                                             "test": [{"Question": "q3", "Answer": "a3"}]}),
                       ["x.json: the data has the splits first, second, test but none is named 'train'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(case, tmp_path, outputs, capsys):
    name, content, parts = BAD[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    code = main(["prepare", "--run", "bad", "--data", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)
    assert not run_paths("bad").root.exists()
    assert not any(p.name.startswith(".bad") for p in outputs.iterdir())


def _special(kind: str, tmp_path: Path) -> Path:
    import os

    path = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_loop":
        os.symlink(tmp_path / "other.jsonl", path)
        os.symlink(path, tmp_path / "other.jsonl")
    elif kind == "self_loop":
        os.symlink(path, path)
    elif kind == "broken_link":
        os.symlink(tmp_path / "gone.jsonl", path)
    elif kind == "link_to_fifo":
        os.mkfifo(tmp_path / "pipe")
        os.symlink(tmp_path / "pipe", path)
    return path


@pytest.mark.parametrize("kind, says", [
    ("fifo", "not a regular file but a named pipe (FIFO)"),
    ("link_to_fifo", "not a regular file but a named pipe (FIFO)"),
    ("symlink_loop", "a symbolic link loop"),
    ("self_loop", "a symbolic link loop"),
    ("broken_link", "a broken symbolic link (to "),
])
def test_data_path_that_is_no_file_says_what_it_is(kind, says, tmp_path, outputs, capsys):
    path = _special(kind, tmp_path)
    assert main(["prepare", "--run", "bad", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and "\n" not in err and "no such file" not in err
    assert says in err
    assert not run_paths("bad").root.exists()


def test_missing_path_exits_2(outputs, capsys):
    assert main(["prepare", "--run", "bad", "--data", "data/examples/nope.jsonl"]) == 2
    assert "data/examples/nope.jsonl: no such file or folder" in capsys.readouterr().err


def test_forced_format_that_does_not_fit_names_the_field(tmp_path, outputs, capsys):
    assert main(["prepare", "--run", "bad", "--data", str(EX / "socratic_questions.jsonl"),
                 "--format", "instruction_response"]) == 2
    assert "line 1: field 'response': missing answer" in capsys.readouterr().err


def test_cli_subprocess_prints_no_traceback(tmp_path, outputs):
    import subprocess
    import sys

    bad = tmp_path / "x.jsonl"
    bad.write_text('{"instruction": "a", "output": ["b?"]}\n{oops}\n', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "lib", "prepare", "--run", "bad", "--data", str(bad)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: line 2: invalid JSON")
    assert "Traceback" not in r.stderr


def test_failed_prepare_leaves_an_existing_run_untouched(tmp_path, outputs):
    run_prepare("keep", str(EX / "qa_splits.json"))
    paths = run_paths("keep")
    before = {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()}
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError):
        run_prepare("keep", str(bad))
    after = {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()}
    assert after == before


# ----------------------------------------------------------------------------- audit

def test_audit_report(outputs):
    report = run_prepare("audit", str(EX / "socratic_questions.jsonl"))
    saved = json.loads(run_paths("audit").data_report.read_text(encoding="utf-8"))
    assert saved == report
    assert report["counts"]["train"] + report["counts"]["eval"] == len(
        (EX / "socratic_questions.jsonl").read_text(encoding="utf-8").splitlines())
    assert report["end_of_turn"]["answers_ending_with_it"] == report["end_of_turn"]["answers"] == report["counts"]["train"]
    assert 0.3 < report["trainable_token_share"] < 1.0
    assert report["pad_distinct_from_eos"] and report["chat_template_present"]
    tl = report["token_lengths"]
    assert tl["min"] <= tl["p50"] <= tl["p95"] <= tl["max"]
    assert sum(tl["histogram"]["counts"]) == report["counts"]["train"]
    assert report["truncation"]["answers_cut"] == 0 and report["warnings"] == []


def test_audit_counts_cut_answers_and_suggests_a_max_length(outputs):
    report = run_prepare("short", str(EX / "socratic_questions.jsonl"), overrides=["train.max_length=64"])
    tr = report["truncation"]
    # an example can be longer than max_length with its answer whole (only the template's last newline cut)
    assert 0 < tr["answers_cut"] <= tr["examples_over_max_length"]
    assert tr["suggested_max_length"] >= report["token_lengths"]["p99"] and tr["suggested_max_length"] % 64 == 0
    assert any("cut by max_length=64" in w for w in report["warnings"])


def test_nothing_left_to_train_on_is_an_error(outputs):
    with pytest.raises(DataError, match="nothing left to train on"):
        run_prepare("tiny-len", str(EX / "socratic_questions.jsonl"), overrides=["train.max_length=8"])
    assert not run_paths("tiny-len").root.exists()


def test_empty_and_duplicate_examples_are_warnings(tmp_path, outputs):
    rows = [{"instruction": "Why?", "output": ["Why not?"]}] * 3 + [{"instruction": "How?", "output": [" "]},
                                                                     {"instruction": "What?", "output": ["Who?"]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    report = run_prepare("dups", str(path), overrides=["data.eval_fraction=0"])
    assert report["counts"] == {"train": 4, "eval": 0, "dropped_empty": 1, "duplicates": 2, "weight0_answers": 0}
    assert any("1 records with no answer to train (empty" in w for w in report["warnings"])
    assert any("2 duplicate examples" in w for w in report["warnings"])
    assert any("no evaluation examples" in w for w in report["warnings"])


def test_all_empty_answers_is_an_error(tmp_path, outputs):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="nothing left to train on"):
        run_prepare("empty", str(path))


def test_rerun_on_other_data_does_not_clobber_results(outputs):
    run_prepare("r", str(EX / "qa_splits.json"))
    paths = run_paths("r")
    paths.adapter.mkdir()  # as if 03 had run
    from lib.run.errors import SFTError

    with pytest.raises(SFTError, match="already holds results trained on other data"):
        run_prepare("r", str(EX / "prompt_completion.jsonl"))
    run_prepare("r", str(EX / "qa_splits.json"))  # same data: fine, results kept
    assert paths.adapter.exists()
    run_prepare("r", str(EX / "prompt_completion.jsonl"), overwrite=True)
    assert not paths.adapter.exists()



def test_preview_shows_the_runs_own_data_first_and_marks_a_cut(prepared_run):
    """The first example is the user's; a borrowed multi-turn sample (the run's data is single-turn) follows,
    labelled; an example longer than max_length ends with the cut mark, decided from its token count."""
    from lib.data.prepare import _rendered, preview, tokenizer_with_template_flag
    from lib.data.readers import read_examples
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(prepared_run)
    examples = read_examples(paths.train_data)
    own, _, borrowed = preview(prepared_run).partition("---- not your data:")
    assert any(ex["messages"][0]["content"][:30] in own for ex in examples)
    assert "socratic_dialogues.json" in borrowed
    tokenizer, _ = tokenizer_with_template_flag(load_config(paths.config))
    assert _rendered(tokenizer, examples[0], 8).endswith("[… cut at max_length=8: longer than what training sees]")
    assert "cut at" not in _rendered(tokenizer, examples[0], 100_000)
