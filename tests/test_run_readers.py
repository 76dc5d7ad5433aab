"""The readers added since the last round go through the run-directory checks (lib/run/rundir.py read_text /
read_json): a FIFO or folder where a file is expected is refused in one line, never waited on; a damaged file
is one line naming it; compare leaves a half-installed or stale eval/ out and says so; --figure needs an image
file name."""

from __future__ import annotations

import json
import os

import pytest

from lib.run.errors import SFTError
from lib.run.rundir import read_json, read_text


@pytest.mark.parametrize("kind", ["fifo", "folder", "deep", "digits", "latin1"])
def test_read_json_refuses_what_is_not_a_json_file_in_one_line(tmp_path, kind):
    path = tmp_path / "settings.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"deep": b"[" * 100_000 + b"]" * 100_000, "digits": b"1" * 5000,
                          "latin1": b'{"a": "caf\xe9"}'}[kind])
    with pytest.raises(SFTError, match=rf"^{path}: ") as e:
        read_json(path)
    assert "\n" not in str(e.value)
    if kind in ("fifo", "latin1"):
        with pytest.raises(SFTError, match=rf"^{path}: "):
            read_text(path)


def _sample(step=0, index=0, **kw):
    return {"step": step, "epoch": 0.0, "index": index, "prompt": "p", "reference": "r", "answer": "a",
            "stopped": True, **kw}


@pytest.mark.parametrize("bad", ["[1, 2]", '"text"', json.dumps({"index": 0, "prompt": "p"}),
                                 json.dumps(_sample(step="2")), "{not json"])
def test_a_damaged_samples_row_is_one_line_naming_file_and_line(tmp_path, bad):
    from lib.train.samples import read_samples

    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join([json.dumps(_sample()), bad, json.dumps(_sample(step=2))]) + "\n")
    with pytest.raises(SFTError, match=rf"^{path}: line 2: "):
        read_samples(path)


def test_the_samples_reader_skips_a_torn_last_line_and_refuses_a_fifo(tmp_path):
    from lib.train.samples import read_samples

    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(_sample()) + "\n" + json.dumps(_sample(step=2))[:20])
    assert read_samples(path) == [_sample()]
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SFTError, match="not a regular file"):
        read_samples(fifo)


@pytest.mark.parametrize("figure", ["curves.txt", "plots", "curves"])
def test_compare_figure_needs_an_image_file_name(outputs, capsys, figure):
    from lib.__main__ import main

    assert main(["compare", "nothing", "--figure", str(outputs / figure)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a file name ending in .png" in err[0], err
    assert not list(outputs.glob("*.png"))


def test_compare_leaves_out_a_half_installed_evaluation_and_says_so(trained_run, capsys):
    """An evaluate killed mid-install (eval/ there, stages/evaluate.pending) is not shown as a result; a FIFO as
    logs/training_metrics.csv is one line, never a hang."""
    import shutil

    from conftest import copy_run

    from lib.evaluate.compare import compare_runs, status_lines
    from lib.run.paths import run_paths
    from lib.run.rundir import begin

    run = copy_run(trained_run, "half-eval")
    paths = run_paths(run)
    try:
        paths.eval_dir.mkdir(exist_ok=True)
        paths.perplexity.write_text(json.dumps({"base": {"perplexity": 9.0}, "tuned": {"perplexity": 1.0}}))
        begin(paths, "evaluate")
        view = compare_runs([run])[0]
        assert view.perplexity is None and any("evaluation left out" in m for m in view.missing), view.missing
        assert any("evaluation left out" in line for line in status_lines([view]))
        paths.metrics_csv.unlink()
        os.mkfifo(paths.metrics_csv)
        with pytest.raises(SFTError, match="not a regular file"):
            compare_runs([run])
    finally:
        shutil.rmtree(paths.root)


@pytest.mark.parametrize("content", [b'{"prompt": "caf\xe9"}\n', b'{"prompt": ' + b"1" * 5000 + b"}\n",
                                     b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                                     b'{"prompt": "\\udcff"}\n', b'{"prompt": "hi"}\n["x"]\n'])
def test_general_prompts_go_through_the_data_reader(tmp_path, content):
    """A Latin-1 byte, a 5,000-digit number, 100,000-deep nesting, a lone surrogate, a non-object record: one
    line naming the file and line (was a traceback after the whole evaluation)."""
    from lib.evaluate.forgetting import load_general_prompts
    from lib.run.errors import DataError

    path = tmp_path / "general.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: line \d") as e:
        load_general_prompts(path)
    assert "\n" not in str(e.value)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SFTError, match="not a file"):
        load_general_prompts(fifo)


def test_a_general_prompt_holding_the_end_of_turn_text_is_refused_before_evaluating(tmp_path, smol_tokenizer):
    from lib.evaluate.forgetting import check_general_prompts
    from lib.run.config import make_config
    from lib.run.errors import DataError

    path = tmp_path / "general.jsonl"
    path.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "Stop here <|im_end|> and go on"}\n')
    cfg = make_config("tiny", overrides={"eval.general_prompts": str(path), "eval.general_examples": 8})
    with pytest.raises(DataError, match=rf"^{path}: line 2: .*end-of-turn token"):
        check_general_prompts(cfg, smol_tokenizer)
    path.write_text('{"prompt": "What is 2 + 2?"}\n')
    assert check_general_prompts(cfg, smol_tokenizer) == [[{"role": "user", "content": "What is 2 + 2?"}]]


@pytest.mark.parametrize("tools", ["fifo", "folder", "latin1", "name-object", "name-empty"])
def test_chat_tools_files_go_through_the_data_reader(tmp_path, tools):
    from lib.data.toolcalls import load_tools

    path = tmp_path / "tools.json"
    if tools == "fifo":
        os.mkfifo(path)
    elif tools == "folder":
        path.mkdir()
    elif tools == "latin1":
        path.write_bytes(b'[{"type": "function", "function": {"name": "caf\xe9"}}]')
    else:
        name = {"a": 1} if tools == "name-object" else " "
        path.write_text(json.dumps([{"type": "function", "function": {"name": name, "parameters": {}}}]))
    with pytest.raises(SFTError) as e:
        load_tools(str(path))
    assert "\n" not in str(e.value) and (str(path) in str(e.value) or "function name" in str(e.value))


@pytest.mark.parametrize("damage", ["folder", "fifo", "unknown-stage", "not-a-manifest"])
def test_a_damaged_manifest_is_one_line_naming_the_stage_to_rerun(outputs, damage):
    from lib.run.paths import run_paths
    from lib.run.rundir import RunDirError, check_result, finish, read_manifest, stages_dir

    paths = run_paths("manifests")
    paths.root.mkdir(parents=True)
    (paths.root / "a.txt").write_text("a")
    finish(paths, "prepare", ["a.txt"], {})
    manifest = stages_dir(paths) / "prepare.json"
    recorded = json.loads(manifest.read_text())
    manifest.unlink()
    if damage == "folder":
        manifest.mkdir()
    elif damage == "fifo":
        os.mkfifo(manifest)
    elif damage == "unknown-stage":
        manifest.write_text(json.dumps({**recorded, "inputs": {"tokenize": "x"}}))
    else:
        manifest.write_text("[1]")
    for read in (lambda: read_manifest(paths, "prepare"), lambda: check_result(paths, "prepare")):
        with pytest.raises(RunDirError, match=rf"^{manifest}: unreadable .*prepare") as e:
            read()
        assert "\n" not in str(e.value)


def test_a_damaged_forgetting_cache_row_is_made_again(prepared_run):
    """eval/forgetting_base.jsonl with a row that is not an answer: the base answers are generated again."""
    from conftest import copy_run

    from lib.evaluate.forgetting import base_answers, cache_key
    from lib.model.loading import load_model_and_tokenizer
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(copy_run(prepared_run, "forgetting-cache"))
    cfg = load_config(paths.config)
    conversations = [[{"role": "user", "content": "Why is the sky blue?"}]]
    key = cache_key(cfg, conversations)
    cache = paths.forgetting_base
    cache.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer(cfg, for_training=False)
    for bad in ([1], {"key": key}, {"key": key, "messages": conversations[0], "answer": 3, "stopped": True}):
        cache.write_text(json.dumps(bad) + "\n")
        rows = base_answers(model, tok, cfg, paths, conversations, progress=False)
        assert len(rows) == 1 and isinstance(rows[0]["answer"], str) and rows[0]["key"] == key
        assert json.loads(cache.read_text())["answer"] == rows[0]["answer"]


def test_chat_refuses_a_prompt_longer_than_the_model_context_before_generating(trained_run):
    from lib.ship.chat import load_session

    session = load_session(trained_run)
    context = session.model.config.max_position_embeddings
    with pytest.raises(SFTError, match=r"^chat: the prompt is [\d,]+ tokens, and the model has [\d,]+ positions"):
        session.send("why " * (context + 10))
    assert session.history == []


def test_the_forgetting_cache_is_keyed_by_the_base_weights_not_only_their_name(tmp_path):
    """A local base model whose weights change under the same folder name gets a new cache key."""
    import shutil

    from lib.evaluate.forgetting import cache_key
    from lib.run.config import make_config
    from lib.run.realmodel import resolve_model

    folder = tmp_path / "base"
    shutil.copytree(resolve_model("tiny"), folder)
    cfg = make_config("tiny", overrides={"model.name_or_path": str(folder)})
    conversations = [[{"role": "user", "content": "hi"}]]
    before = cache_key(cfg, conversations)
    assert cache_key(cfg, conversations) == before
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # other weights, same name and size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert cache_key(cfg, conversations) != before


def test_the_train_manifest_hashes_the_adapters_tokenizer_and_template(trained_run):
    """The adapter's tokenizer files and chat template are what every later stage renders prompts with: one
    changed after training is named, with train to rerun, by every stage that loads the adapter."""
    import shutil

    from conftest import copy_run

    from lib.run.paths import run_paths
    from lib.run.rundir import RunDirError, check_trained, read_manifest

    recorded = read_manifest(run_paths(trained_run), "train")["outputs"]
    assert {"adapter/tokenizer_config.json", "adapter/run_config.json"} <= set(recorded), sorted(recorded)
    run = copy_run(trained_run, "tokenizer-edited")
    paths = run_paths(run)
    try:
        name = "chat_template.jinja" if (paths.adapter / "chat_template.jinja").exists() else "tokenizer_config.json"
        with open(paths.adapter / name, "a", encoding="utf-8") as f:
            f.write("\n")
        with pytest.raises(RunDirError, match=rf"{name} is not the file train wrote .*--retrain"):
            check_trained(paths)
    finally:
        shutil.rmtree(paths.root)
