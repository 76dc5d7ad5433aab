"""Compressed files, shards and globs read as one data set, and several sources mixed by weight.

Containers: the same records written plain and as .gz / .bz2 / .xz / .zst around JSONL, JSON and CSV (and
Parquet) become the same examples; a damaged file is refused in one line naming it. Shards: a folder in
the Hub's layout (data/train-00000-of-00002.parquet, ..., data/test-00000-of-00001.parquet) keeps its
test split, a glob reads its files as one set, and a bad record names its own shard and line. Sources:
`--data A --data B` with data.mix_weights gives a training split whose shares match the weights within
5% for both interleave strategies, the eval split keeps every source, each source has its own shape and
column mapping (data.sources), and data/report.json gives each source's examples, tokens and share.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from lib.__main__ import main
from lib.data.examples import prepare_examples
from lib.data.prepare import run_prepare
from lib.data.readers import read_examples
from lib.data.sources import mix, sources_table
from lib.run.errors import DataError, SFTError
from lib.run.paths import run_paths

# HelpSteer2's layout, as the issue found it shipped: prompt, response and five scores, as .jsonl.gz
RECORDS = [{"prompt": f"Question number {i}?", "response": f"Answer number {i}.", "helpfulness": i % 5,
            "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2} for i in range(6)]
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
            "zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def _text(kind: str, records) -> bytes:
    if kind == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if kind == "json":
        return json.dumps(records).encode()
    lines = ["prompt,response"] + [f"{r['prompt']},{r['response']}" for r in records]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
@pytest.mark.parametrize("comp", list(COMPRESS))
def test_compressed_files_read_as_the_plain_ones(kind, comp, tmp_path):
    records = RECORDS if kind != "csv" else [{"prompt": r["prompt"], "response": r["response"]} for r in RECORDS]
    plain = tmp_path / f"data.{kind}"
    plain.write_bytes(_text(kind, records))
    packed = tmp_path / f"data.{kind}.{comp}"
    packed.write_bytes(COMPRESS[comp](_text(kind, records)))
    a, b = (prepare_examples(str(p), eval_fraction=0.0) for p in (plain, packed))
    assert b.format == "prompt_response" and len(b.train) == len(records)
    assert [ex["messages"] for ex in b.train] == [ex["messages"] for ex in a.train]
    assert b.container.endswith(f"({comp})")


def test_compressed_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    packed = tmp_path / "data.parquet.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert len(prepare_examples(str(packed), eval_fraction=0.0).train) == len(RECORDS)


@pytest.mark.parametrize("comp", list(COMPRESS))
def test_a_damaged_compressed_file_is_one_line_naming_it(comp, tmp_path):
    path = tmp_path / f"data.jsonl.{comp}"
    path.write_bytes(COMPRESS[comp](_text("jsonl", RECORDS))[:-7] if comp != "gz" else b"not gzip at all")
    with pytest.raises(DataError) as e:
        prepare_examples(str(path))
    assert str(path) in str(e.value) and f"not a readable .{comp} file" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_record_inside_a_compressed_file_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(_text("jsonl", RECORDS) + b'{"prompt": "x", "response": 5}\n'))
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: line 7: field 'response'"):
        prepare_examples(str(path))


def test_unsupported_type_names_what_is(tmp_path):
    path = tmp_path / "data.txt.gz"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(DataError, match=r"unsupported file type '\.txt\.gz' \(use \.json, \.jsonl, \.csv or "
                                        r"\.parquet, each also compressed as \.gz, \.bz2, \.xz or \.zst"):
        prepare_examples(str(path))


def _hub_layout(root):
    (root / "data").mkdir(parents=True)
    for n in range(2):
        pq.write_table(pa.Table.from_pylist(RECORDS[n * 3:(n + 1) * 3]), root / "data" / f"train-0000{n}-of-00002.parquet")
    test = [{"prompt": "Held-out question?", "response": "Held-out answer.", "helpfulness": 3, "correctness": 3,
             "coherence": 3, "complexity": 1, "verbosity": 1}]
    pq.write_table(pa.Table.from_pylist(test), root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# a data set card\n")


def test_a_folder_of_shards_is_one_data_set_with_its_test_split(tmp_path, outputs):
    _hub_layout(tmp_path / "helpsteer")
    p = prepare_examples(str(tmp_path / "helpsteer"))
    assert len(p.train) == 6 and [ex["messages"][0]["content"] for ex in p.eval] == ["Held-out question?"]
    assert p.eval_from == "the 'test' split of the data" and p.container == "3 parquet files"
    report = run_prepare("shards", str(tmp_path / "helpsteer"), overrides=["data.eval_fraction=0"])
    assert [f.rsplit("/", 1)[-1] for f in report["files"]] == [
        "test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_a_glob_reads_its_files_and_errors_name_the_shard(tmp_path):
    for n in range(3):
        (tmp_path / f"part-{n}.jsonl").write_bytes(_text("jsonl", RECORDS[n * 2:(n + 1) * 2]))
    p = prepare_examples(str(tmp_path / "part-*.jsonl"), eval_fraction=0.0)
    assert [ex["messages"][0]["content"] for ex in p.train] == [r["prompt"] for r in RECORDS]
    assert p.files == [str(tmp_path / f"part-{n}.jsonl") for n in range(3)]
    (tmp_path / "part-1.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{\"prompt\": \"x\", \"response\": null}\n")
    with pytest.raises(DataError, match=r"part-1\.jsonl: line 2: field 'response': missing answer"):
        prepare_examples(str(tmp_path / "part-*.jsonl"))
    with pytest.raises(DataError, match="no data file matches this pattern"):
        prepare_examples(str(tmp_path / "nothing-*.jsonl"))


# ----------------------------------------------------------------------------- several sources


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture()
def two_sources(tmp_path):
    task = _write(tmp_path / "task.jsonl", [{"instruction": f"Task {i}?", "output": f"Answer {i}."} for i in range(240)])
    general = _write(tmp_path / "general.jsonl", [{"messages": [{"role": "user", "content": f"General {i}?"},
                                                                {"role": "assistant", "content": f"Reply {i}."}]}
                                                  for i in range(150)])
    return task, general


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
@pytest.mark.parametrize("weights", [[3, 1], [1, 9]])
def test_shares_match_the_weights_and_eval_keeps_every_source(two_sources, strategy, weights, outputs):
    report = run_prepare("mix", list(two_sources), overrides=[f"data.mix_weights={weights}",
                                                               f"data.mix_strategy={strategy}"])
    rows = {r["source"]: r for r in report["sources"]}
    train = read_examples(run_paths("mix").train_data)
    for (name, row), w in zip(rows.items(), weights):
        share = sum(ex["metadata"]["_source"] == name for ex in train) / len(train)
        assert abs(share - w / sum(weights)) <= 0.05 and row["share"] == round(share, 4)
        assert row["target_share"] == round(w / sum(weights), 4) and row["eval"] > 0 and row["trained_tokens"] > 0
    sizes = {"task.jsonl": rows["task.jsonl"]["train"], "general.jsonl": rows["general.jsonl"]["train"]}
    if strategy == "interleave_under":  # the first source to run out is used whole, none repeated
        assert len({json.dumps(ex["messages"]) for ex in train}) == len(train)
        assert sizes["task.jsonl"] == 216 or sizes["general.jsonl"] == 135
    else:  # every source used whole at least once
        assert sizes["task.jsonl"] >= 216 and sizes["general.jsonl"] >= 135
    assert {ex["metadata"]["_source"] for ex in read_examples(run_paths("mix").eval_data)} == set(rows)
    table = sources_table(report)
    assert list(table.index) == ["task.jsonl", "general.jsonl"] and list(table["share"]) == [
        rows["task.jsonl"]["share"], rows["general.jsonl"]["share"]]


def test_mix_holds_the_shares_at_every_prefix():
    a, b = [{"i": i} for i in range(100)], [{"j": j} for j in range(100)]
    out = mix([a, b], [1.0, 3.0], "interleave_under", 0)
    assert len(out) == 133
    for n in range(4, len(out), 4):
        assert sum("i" in ex for ex in out[:n]) == n // 4
    assert mix([a, b], None, "concat", 0) == a + b


def test_sources_in_the_config_with_their_own_shape_and_columns(tmp_path, outputs):
    faq = _write(tmp_path / "faq.jsonl", [{"q": f"FAQ {i}?", "a": f"FAQ answer {i}.", "notes": "internal"}
                                          for i in range(20)])
    chats = _write(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": f"Chat {i}?"},
                                                                  {"from": "gpt", "value": f"Chat reply {i}."}]}
                                              for i in range(20)])
    sources = json.dumps([{"path": faq, "columns": {"prompt": "q", "response": "a"}, "ignore_fields": ["notes"],
                           "weight": 1}, {"path": chats, "weight": 1}])
    report = run_prepare("cfgmix", overrides=[f"data.sources={sources}"])
    assert [r["format"] for r in report["sources"]] == ["columns", "sharegpt"]
    saved = yaml.safe_load(run_paths("cfgmix").config.read_text())["data"]
    assert [s["format"] for s in saved["sources"]] == ["columns", "sharegpt"] and saved["mix_strategy"] == "auto"
    train = read_examples(run_paths("cfgmix").train_data)
    by_source = {name: [ex for ex in train if ex["metadata"]["_source"] == name] for name in ("faq.jsonl", "chats.jsonl")}
    assert len(by_source["faq.jsonl"]) == len(by_source["chats.jsonl"]) == 18
    assert all(ex["messages"][0]["content"].startswith("FAQ ") for ex in by_source["faq.jsonl"])
    assert all(ex["messages"][1]["content"].startswith("Chat reply") for ex in by_source["chats.jsonl"])


def test_cli_mixes_several_data_and_refuses_bad_weights_in_one_line(two_sources, outputs, capsys):
    task, general = two_sources
    assert main(["prepare", "--run", "cli", "--data", task, "--data", general, "--set", "data.mix_weights=[3,1]"]) == 0
    out = capsys.readouterr().out
    assert "task.jsonl: " in out and "(75.0%)" in out
    cases = {"data.mix_weights=[3,1,1]": "3 weights for 2 sources",
             "data.mix_weights=[3,0]": "weight 2 must be a number above 0",
             "data.mix_strategy=concat": "concat keeps every record once"}
    for setting, message in cases.items():
        extra = ["--set", "data.mix_weights=[3,1]"] if "strategy" in setting else []
        assert main(["prepare", "--run", "bad", "--data", task, "--data", general, "--set", setting, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not run_paths("bad").root.exists()
    assert main(["prepare", "--run", "bad"]) == 2 and "--data is required" in capsys.readouterr().err
    sources = json.dumps([{"path": task}, {"path": general, "eval_fraction": 0}])
    assert main(["prepare", "--run", "cfg", "--set", f"data.sources={sources}", "--set", "data.mix_weights=[1,1]"]) == 0
    assert {ex["metadata"]["_source"] for ex in read_examples(run_paths("cfg").eval_data)} == {"task.jsonl"}


def test_a_bad_record_in_a_source_names_the_source_file_and_line(two_sources, tmp_path, outputs):
    bad = _write(tmp_path / "bad.jsonl", [{"instruction": "x", "output": 3}])
    with pytest.raises(SFTError, match=r"data source 2 \(bad.jsonl\): .*bad\.jsonl: line 1: field 'output'"):
        run_prepare("badsrc", [two_sources[0], bad])


def test_training_logs_each_sources_eval_loss_and_plots_it(tmp_path, outputs):
    from lib.evaluate.plots import run_plots
    from lib.train.report import metrics_frame
    from lib.train.training import run_train

    task = _write(tmp_path / "task.jsonl", [{"instruction": f"Name the number after {i}.", "output": f"{i + 1}."}
                                            for i in range(30)])
    chat = _write(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": f"Say hello to friend {i}."},
                                                               {"from": "gpt", "value": f"Hello, friend {i}!"}]}
                                            for i in range(30)])
    run_prepare("bysource", [task, chat], overrides=["data.mix_weights=[1,1]", "data.eval_fraction=0.2",
                                                     "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
                                                     "train.logging_steps=1", "eval.generate_examples=0"])
    summary = run_train("bysource")
    series = summary["eval_loss_by_source"]
    assert set(series) == {"task.jsonl", "chat.jsonl"}
    frame = metrics_frame("bysource")
    eval_steps = [int(s) for s, v in zip(frame["step"], frame["eval_loss"]) if v == v]  # NaN: a training row
    for points in series.values():
        assert [s for s, _ in points] == eval_steps and all(0 < loss < 50 for _, loss in points)
    assert series["task.jsonl"] != series["chat.jsonl"]
    assert any(p.name == "eval_loss_by_source.png" for p in run_plots("bysource"))


def test_a_test_file_beside_an_unnamed_one_is_refused_not_trained(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "data.jsonl").write_bytes(_text("jsonl", RECORDS))
    (tmp_path / "set" / "test.jsonl").write_bytes(_text("jsonl", RECORDS[:2]))
    with pytest.raises(DataError, match="test.jsonl is named for the 'test' split but data.jsonl for none"):
        prepare_examples(str(tmp_path / "set"))
