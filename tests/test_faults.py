"""Faults and hostile files (issue 22): a full or read-only disk, memory running out, damaged checkpoint
files, hostile config.yaml and data files, an unbounded max_new_tokens. Each ends in one line (exit 2 or
3), loses nothing and leaves the run usable. Faults are injected at exact points (a patched write or
function); nothing fills the disk or the memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import copy_run

from lib.__main__ import main
from lib.run.config import load_config, make_config, save_config
from lib.run.errors import ConfigError
from lib.run.paths import REPO_ROOT


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------------------ config.yaml


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(make_config("tiny", run="x"), path)
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("non-UTF-8 bytes", lambda t: t.encode() + b"# \xff\xfe\n", ": not valid UTF-8 (byte 0xff)"),
    ("5,000-deep nesting", lambda t: t.replace("name_or_path: tiny", "name_or_path: " + "[" * 5000 + "]" * 5000),
     "invalid YAML (nested more than 20 levels deep)"),
    ("an anchor and alias", lambda t: t.replace("name_or_path: tiny", "name_or_path: &a tiny\n  revision: *a"),
     "invalid YAML (YAML anchors and aliases (&name, *name) are not allowed)"),
    ("a list for a string", lambda t: t.replace("name_or_path: tiny", "name_or_path: [a, b]"),
     "model.name_or_path: cannot use ['a', 'b'] (expected str)"),
    ("a mapping for a string", lambda t: t.replace("name_or_path: tiny", "name_or_path: {a: b}"),
     "model.name_or_path: cannot use {'a': 'b'} (expected str)"),
])
def test_a_hostile_config_yaml_is_one_line(config_file, name, edit, message):
    text = edit(config_file.read_text())
    config_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(config_file)
    assert str(e.value).startswith(str(config_file)) and message in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Ten levels of ten aliases (10^10 strings once expanded): refused at the first anchor. Run in a
    process limited to 2 GB and 60 s, so that a regression fails the test instead of taking the machine."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    lines += ["model:", "  name_or_path: *a9"]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from lib.run.config import load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
            "print('maxrss', hwm)\n")  # this process's own peak (ru_maxrss would carry the parent's across exec)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.stdout.startswith("ConfigError") and "anchors and aliases" in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split("maxrss")[-1]) < 1 << 20  # the child's own peak, in KiB: under 1 GiB


def test_a_fifo_in_place_of_config_yaml_is_refused_without_blocking(config_file):
    config_file.unlink()
    os.mkfifo(config_file)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(config_file)


def test_a_hostile_config_yaml_is_one_line_in_the_cli(prepared_run, capsys):
    from conftest import copy_run

    from lib.run.paths import run_paths

    run = copy_run(prepared_run, "faults-config")
    cfg = run_paths(run).config
    cfg.write_bytes(cfg.read_bytes().replace(b"name_or_path: tiny", b"name_or_path: &a tiny\n  revision: *a"))
    assert main(["train", "--run", run]) == 2
    assert "anchors and aliases" in _one_error_line(capsys)


# ------------------------------------------------------------------------------ data files

_GOOD = '{"prompt": "a question", "completion": "an answer"}\n'


@pytest.mark.parametrize("name, content, message", [
    ("a 5,000-digit integer", '{"prompt": "hi", "completion": ' + "9" * 5000 + "}\n",
     "line 1: invalid JSON (a number too long: Exceeds the limit (4300 digits)"),
    ("a 100,000-deep array", '{"prompt": "hi", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "line 1: invalid JSON (nested too deeply)"),
    ("a lone surrogate escape", '{"prompt": "hi \\ud83d there", "completion": "ok"}\n',
     "line 1: field 'prompt': a lone surrogate escape"),
])
def test_a_hostile_data_file_is_one_line_naming_file_line_and_field(outputs, tmp_path, capsys, name, content,
                                                                     message):
    data = tmp_path / "data.jsonl"
    data.write_text(_GOOD * 3 + content + _GOOD * 3)
    assert main(["prepare", "--run", "hostile", "--data", str(data)]) == 2
    assert _one_error_line(capsys).startswith(f"error: {data}: " + message.replace("line 1", "line 4"))
    assert not (outputs / "hostile").exists()


def test_a_hostile_json_array_names_the_record(outputs, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text("[" + (_GOOD * 2).replace("\n", ",") + '{"prompt": "x", "completion": "\\udc00"}]')
    assert main(["prepare", "--run", "hostile", "--data", str(data)]) == 2
    assert _one_error_line(capsys).startswith(f"error: {data}: record 3: a lone surrogate escape")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["prepare", "--run", "hostile", "--data", str(deep)]) == 2
    assert _one_error_line(capsys) == f"error: {deep}: invalid JSON (nested too deeply)"


def test_a_200000_character_field_reads_the_same_from_csv_and_jsonl(tmp_path):
    from lib.data.readers import load_records

    long = "x" * 200_000
    (tmp_path / "d.csv").write_text('prompt,completion\nhi,"' + long + '"\n')
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi", "completion": "' + long + '"}\n')
    csv_rows = [r.record for r in load_records(str(tmp_path / "d.csv")).records]
    jsonl_rows = [r.record for r in load_records(str(tmp_path / "d.jsonl")).records]
    assert csv_rows == jsonl_rows == [{"prompt": "hi", "completion": long}]


# ------------------------------------------------------------------------------ checkpoint files


def _hostile_pickle(path):
    """The same zip archive with its pickle replaced by one that calls os.system (valid zip, valid CRCs)."""
    import pickle
    import zipfile

    class Call:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    members = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            members[info.filename] = z.read(info)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, pickle.dumps(Call(), protocol=2) if name.endswith("data.pkl") else data)


def _set_global_step(path, value):
    import json

    state = json.loads(path.read_text())
    state["global_step"] = value
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("name, damage, problem", [
    ("optimizer.pt", _hostile_pickle, "optimizer.pt is truncated or unreadable"),
    ("scheduler.pt", _hostile_pickle, "scheduler.pt is truncated or unreadable"),
    ("rng_state.pth", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
     "rng_state.pth is truncated or unreadable"),
    ("rng_state.pth", _hostile_pickle, "rng_state.pth is truncated or unreadable"),
    ("trainer_state.json", lambda p: _set_global_step(p, "20"), "global_step is not a whole number ('20')"),
    ("trainer_state.json", lambda p: _set_global_step(p, 20.5), "global_step is not a whole number ('20.5')"),
])
def test_a_damaged_checkpoint_file_skips_the_checkpoint(trained_run, tmp_path, name, damage, problem):
    from lib.run.paths import run_paths
    from lib.train.checkpoints import CheckpointWarning, checkpoint_problem, last_checkpoint

    found = sorted(run_paths(trained_run).checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    older, newer = found[-2], found[-1]
    for ck in (older, newer):
        shutil.copytree(ck, tmp_path / ck.name)
    assert checkpoint_problem(tmp_path / newer.name) is None
    damage(tmp_path / newer.name / name)
    assert checkpoint_problem(tmp_path / newer.name) == problem or problem in checkpoint_problem(tmp_path / newer.name)
    with pytest.warns(CheckpointWarning, match=f"{newer.name} "):
        assert last_checkpoint(tmp_path, clean=True) == tmp_path / older.name
    assert not (tmp_path / newer.name).exists()


# ------------------------------------------------------------------------------ generation


def test_an_unbounded_max_new_tokens_is_cut_to_the_models_context(trained_run):
    import warnings

    from lib.model.generation import generate_answers, generate_reply
    from lib.model.loading import load_tuned_model
    from lib.run.paths import run_paths
    from lib.run.settings import GenerationSettings

    cfg = load_config(run_paths(trained_run).config)
    model, tokenizer = load_tuned_model(cfg, run_paths(trained_run).adapter)[:2]
    model.config.max_position_embeddings = context = 96  # what the cut reads; fewer positions to generate than its 1,024
    huge = GenerationSettings(max_new_tokens=2147483647, do_sample=False)
    with pytest.warns(UserWarning, match=f"max_new_tokens=2147483647 is more than the model's context of {context}"):
        reply = generate_reply(model, tokenizer, [{"role": "user", "content": "hi"}], settings=huge)
    assert reply["n_tokens"] < context
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        answers = generate_answers(model, tokenizer, [[{"role": "user", "content": "hi"}]], huge, progress=False)
    assert len(answers) == 1 and any("cut to" in str(w.message) for w in seen)


# ------------------------------------------------------------------------------ full and read-only disks, memory

SAMPLE2 = REPO_ROOT / "data" / "examples" / "socratic_dialogues.json"


def _failing_fdopen(monkeypatch, outputs, err, name_part=""):
    """os.fdopen whose files under `outputs` (named with `name_part`) fail to write with OSError(err)."""
    import errno as errno_mod

    real = os.fdopen

    class Failing:
        def __init__(self, f, path):
            self.f, self.path = f, path

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(err, os.strerror(err), self.path)

    def fdopen(fd, *a, **kw):
        f = real(fd, *a, **kw)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(outputs)) and name_part in os.path.basename(path):
            return Failing(f, path)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return errno_mod


def test_a_full_disk_while_preparing_keeps_the_earlier_data(outputs, monkeypatch, capsys):
    import errno

    from lib.run.paths import run_paths
    from lib.run.rundir import fingerprint

    assert main(["prepare", "--run", "full", "--data", str(REPO_ROOT / "data/examples/socratic_questions.jsonl")]) == 0
    paths = run_paths("full")
    before = paths.train_data.read_bytes()
    _failing_fdopen(monkeypatch, outputs, errno.ENOSPC, "eval.jsonl")
    capsys.readouterr()
    assert main(["prepare", "--run", "full", "--data", str(SAMPLE2)]) == 3
    line = _one_error_line(capsys)
    assert line.startswith("error: no space left on the device: ") and "eval.jsonl" in line and " GB free of " in line
    assert "The run's earlier data and config.yaml are kept." in line and "python -m lib prepare --run full" in line
    assert paths.train_data.read_bytes() == before and fingerprint(paths, "prepare")  # intact, as it was
    assert not [p for p in outputs.iterdir() if "-prepare-" in p.name]  # no staging folder left


def test_a_read_only_outputs_folder_and_outputs_that_is_a_file_are_one_line(outputs, monkeypatch, capsys, tmp_path):
    import errno

    data = str(REPO_ROOT / "data/examples/socratic_questions.jsonl")
    _failing_fdopen(monkeypatch, outputs, errno.EROFS)
    assert main(["prepare", "--run", "ro", "--data", data]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: the file system is read-only: ") and "make " in line and "writable" in line
    monkeypatch.undo()
    afile = tmp_path / "a-file"
    afile.write_text("")
    monkeypatch.setenv("SFT_OUTPUTS_DIR", str(afile))
    assert main(["prepare", "--run", "x", "--data", data]) == 2
    assert _one_error_line(capsys).startswith(f"error: a file stands where a folder should be: {afile} ")


def test_prepare_overwrite_does_not_delete_through_a_symlinked_run_folder(outputs, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "checkpoints").mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (outputs / "linked").symlink_to(elsewhere)
    assert main(["prepare", "--run", "linked", "--data", str(SAMPLE2), "--overwrite"]) == 2
    assert "is a symbolic link" in _one_error_line(capsys)
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_cpu_out_of_memory_is_the_exit_3_message(prepared_run, monkeypatch, capsys):
    from lib.data import prepare as data
    from lib.model import loading
    from lib.train import training as train

    run = "faults-oom"  # prepared here, from other data
    assert main(["prepare", "--run", run, "--data", str(SAMPLE2), "--profile", "tiny"]) == 0
    monkeypatch.setattr(data, "audit", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "1073741824 bytes. Error code 12 (Cannot allocate memory)")))
    assert main(["prepare", "--run", "oom", "--data", str(SAMPLE2)]) == 3
    line = _one_error_line(capsys)
    assert line.startswith("error: out of memory in prepare: ") and "GiB available of" in line

    def no_memory(*a, **kw):
        raise MemoryError()

    monkeypatch.setattr(train, "load_model_and_tokenizer", no_memory)
    assert loading  # the loader train calls is patched where train looks it up
    assert main(["train", "--run", run]) == 3
    assert _one_error_line(capsys).startswith("error: out of memory in training, loading the model: ")


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_or_the_adapter_is_one_line_and_training_resumes(prepared_run,
                                                                                             monkeypatch, capsys):
    """torch's writer fails as it does on a full disk ("unexpected pos") at the second checkpoint, then the
    final adapter's safetensors write fails; each is exit 3 in one line, and the third run finishes."""
    import peft.peft_model
    import safetensors.torch
    import torch

    from lib.run.paths import run_paths

    run = copy_run(prepared_run, "faults-full")
    sets = ["--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "train.eval_steps=2"]
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1664 vs 1558")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--run", run, "--retrain", *sets]) == 3  # --retrain: the fixture may be trained
    line = _one_error_line(capsys)
    assert "writing a file failed (" in line and "unexpected pos" in line and " GB free of " in line
    assert "The checkpoints saved before are kept" in line
    monkeypatch.undo()
    real_st = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **kw):
        if "checkpoint-" not in str(filename):
            raise OSError(28, "No space left on device", str(filename))
        return real_st(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)  # what peft's save_pretrained calls
    assert main(["train", "--run", run, *sets]) == 3
    assert _one_error_line(capsys).startswith("error: no space left on the device: ")
    monkeypatch.undo()
    assert main(["train", "--run", run, *sets]) == 0
    paths = run_paths(run)
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_merging_or_evaluating_keeps_nothing_half_written(trained_run, monkeypatch, capsys):
    import errno

    import transformers.modeling_utils

    from lib.run.paths import run_paths

    run = copy_run(trained_run, "faults-merge")
    paths = run_paths(run)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                     "\"No space left on device\" })")))
    assert main(["merge", "--run", run]) == 3
    assert "No space left on device" in _one_error_line(capsys)
    assert not paths.merged.exists() and not [p for p in paths.root.iterdir() if p.name.startswith(".merged-")]
    monkeypatch.undo()
    _failing_fdopen(monkeypatch, paths.root, errno.ENOSPC, "metrics")
    assert main(["evaluate", "--run", run, "--set", "eval.generate_examples=1", "--set", "eval.max_examples=2"]) == 3
    assert "The earlier evaluate results are kept" in _one_error_line(capsys)
    assert not paths.generation_metrics.exists()
