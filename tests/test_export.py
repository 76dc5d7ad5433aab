"""GGUF export with llama.cpp's converter and quantizer, the Modelfile, the parity check, push --dry-run.

Needs the `export` extra (llama-cpp-python) and llama.cpp's converter (fetched once by `make install`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_run, reseal

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow


# Fewer and shorter greedy answers than the defaults (8 prompts, up to 48 tokens): seconds, not a minute.
QUICK = ["export.parity_examples=4", "generation.max_new_tokens=16", "export.parity_tokens=16"]


@pytest.fixture(scope="module")
def merged_run(trained_run) -> str:
    from lib.evaluate.evaluation import run_evaluate
    from lib.ship.merge import run_merge

    run = copy_run(trained_run, "export_copy")
    run_evaluate(run, overrides=["eval.generate_examples=2", "generation.max_new_tokens=8"], progress=False)
    run_merge(run)
    return run


@pytest.fixture(scope="module")
def f16_export(merged_run):
    from lib.ship.export import run_export

    return run_export(merged_run, quant="f16", overrides=QUICK, progress=False)


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _cli(argv, capsys):
    from lib.__main__ import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # progress bars go to stderr too; the error itself is one line
    return rc, [ln for ln in err.splitlines() if ln.startswith("error")]


def test_f16_export_carries_template_and_stop_tokens_and_matches_transformers(merged_run, f16_export):
    from transformers import AutoTokenizer

    from lib.data.templates import stop_token_ids
    from lib.run.paths import run_paths

    paths = run_paths(merged_run)
    gguf = paths.root / "export" / f"{merged_run}-f16.gguf"
    assert gguf.exists() and (paths.root / "export" / "parity.json").exists()
    tok = AutoTokenizer.from_pretrained(str(paths.merged))
    fields = _gguf_fields(gguf)
    assert fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] in stop_token_ids(tok)
    assert fields["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))

    r = f16_export
    assert r["ok"], r["failures"]
    assert r["prompts"] > 0
    assert r["prompt_tokens"]["identical"] == r["prompts"]
    assert r["prompt_tokens"]["identical_from_gguf_template"] == r["prompts"]
    assert r["prompt_tokens"]["identical_from_modelfile_template"] == r["prompts"]
    assert r["stop_tokens"]["end_of_generation_in_gguf"]
    assert r["perplexity"]["relative_drift"] < 0.01
    assert r["perplexity"]["llama_cpp"]["tokens"] == r["perplexity"]["transformers"]["tokens"]
    assert r["greedy"]["agreement"] >= 0.75
    assert json.loads((paths.root / "export" / "parity.json").read_text()) == r


def test_modelfile_names_the_gguf_template_stops_and_settings(merged_run, f16_export):
    from transformers import AutoTokenizer

    from lib.data.prompts import render_prompt
    from lib.data.templates import stop_token_ids
    from lib.run.config import apply_overrides, load_config
    from lib.run.paths import run_paths
    from lib.ship.ollama import render_with_pieces, template_pieces

    paths = run_paths(merged_run)
    cfg = apply_overrides(load_config(paths.config), QUICK)  # the settings the export ran with
    text = (paths.root / "export" / "Modelfile").read_text()
    lines = text.splitlines()
    assert f"FROM ./{merged_run}-f16.gguf" in lines
    tok = AutoTokenizer.from_pretrained(str(paths.merged))
    stops = [json.loads(ln.split(" ", 2)[2]) for ln in lines if ln.startswith("PARAMETER stop ")]
    assert stops == tok.convert_ids_to_tokens(stop_token_ids(tok))
    assert f"PARAMETER num_predict {cfg.generation.max_new_tokens}" in lines
    assert f"PARAMETER repeat_penalty {cfg.generation.repetition_penalty:g}" in lines
    assert 'TEMPLATE """' in text and "{{ .Content }}" in text
    # the Modelfile's pieces render multi-turn conversations with a system message to the same ids
    pieces = template_pieces(tok)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because."}, {"role": "user", "content": "And then?"}]
    ids = tok(render_prompt(tok, conv), add_special_tokens=False)["input_ids"]
    assert tok(pieces["head"] + render_with_pieces(pieces, conv), add_special_tokens=False)["input_ids"] == ids


def test_q8_0_via_the_cli_and_a_failed_parity_gate_exits_1_naming_the_figure(merged_run, f16_export, capsys):
    from lib.run.paths import run_paths

    run = copy_run(merged_run, "export_q8")  # with the f16 export; the shared run's export/ stays f16's
    export = run_paths(run).root / "export"
    quick = [a for kv in QUICK for a in ("--set", kv)]
    rc, err = _cli(["export", "--run", run, "--quant", "q8_0", "--set", "export.ppl_tolerance=1e-9", *quick],
                   capsys)
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: parity check failed: perplexity drift") and "export.ppl_tolerance 1e-09" in err[0]
    q8, f16 = export / f"{run}-q8_0.gguf", export / f"{merged_run}-f16.gguf"
    assert q8.exists() and f16.exists()  # the earlier type is kept
    assert _gguf_fields(q8)["general.file_type"] == 7  # MOSTLY_Q8_0
    assert q8.stat().st_size < f16.stat().st_size
    report = json.loads((export / "parity.json").read_text())
    assert report["quant"] == "q8_0" and not report["ok"]
    assert report["prompt_tokens"]["identical"] == report["prompts"]
    assert report["perplexity"]["relative_drift"] < 0.03  # the real drift of q8_0 is small
    assert not list(run_paths(run).root.glob(".export-*"))


def _assert_bad_export(argv, capsys, run, *needles):
    from lib.run.paths import run_paths

    export = run_paths(run).root / "export"
    before = sorted(p.name for p in export.iterdir()) if export.exists() else None
    rc, err = _cli(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert (sorted(p.name for p in export.iterdir()) if export.exists() else None) == before
    assert not list(run_paths(run).root.glob(".export-*"))


def test_export_before_merge_names_the_merge_step(trained_run, capsys):
    _assert_bad_export(["export", "--run", trained_run], capsys, trained_run, "merged", "python -m lib merge")


def test_unknown_quantization_type(merged_run, capsys):
    _assert_bad_export(["export", "--run", merged_run, "--quant", "q3_x"], capsys, merged_run,
                       "unknown quantization type 'q3_x'", "q4_k_m")


def test_missing_converter(merged_run, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    _assert_bad_export(["export", "--run", merged_run], capsys, merged_run, "LLAMA_CPP_DIR", "convert_hf_to_gguf.py")


def test_converter_that_cannot_be_fetched(merged_run, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    _assert_bad_export(["export", "--run", merged_run], capsys, merged_run, "converter is missing", "LLAMA_CPP_DIR")
    assert not (tmp_path / "cache" / "qlora-notebooks").exists() or not any(
        p.name.startswith("llama.cpp-") for p in (tmp_path / "cache" / "qlora-notebooks").iterdir())


@pytest.mark.long  # ~10 s: the converter run on a renamed architecture (make test-long)
def test_an_architecture_llama_cpp_does_not_know_is_one_line(merged_run, capsys):
    from lib.run.paths import run_paths

    run = copy_run(merged_run, "export_unknown_arch")
    cfg_file = run_paths(run).merged / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    cfg_file.write_text(json.dumps(cfg))
    reseal(run, "merge")  # as if merge wrote it (a changed file is refused before the converter runs)
    _assert_bad_export(["export", "--run", run], capsys, run, "does not know the architecture NoSuchModelForCausalLM")


@pytest.mark.long  # ~11 s: the converter run on cut weights (make test-long)
def test_weights_the_converter_cannot_read_are_one_line(merged_run, capsys):
    from lib.run.paths import run_paths

    run = copy_run(merged_run, "export_broken_weights")
    weights = run_paths(run).merged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    reseal(run, "merge")
    _assert_bad_export(["export", "--run", run], capsys, run, "converter failed", "export.log")


def test_push_dry_run_writes_the_exact_folder(merged_run, f16_export, capsys, monkeypatch):
    from lib.run.paths import run_paths

    secret = "hf_testTOKENneverWRITTEN123"
    monkeypatch.setenv("HF_TOKEN", secret)
    paths = run_paths(merged_run)
    rc, err = _cli(["push", "--run", merged_run, "--repo", "someone/tiny-socratic", "--dry-run"], capsys)
    assert rc == 0, err
    folder = paths.root / "push"
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "adapter/adapter_config.json",
            f"{merged_run}-f16.gguf", "Modelfile", "parity.json"} <= files
    assert (folder / "model.safetensors").read_bytes() == (paths.merged / "model.safetensors").read_bytes()
    card = (folder / "README.md").read_text()
    data_hash = json.loads(paths.data_report.read_text())["data_hash"]
    parity = json.loads((paths.root / "export" / "parity.json").read_text())
    assert data_hash in card
    assert f"{parity['perplexity']['llama_cpp']['perplexity']:.4f}" in card
    assert f"{json.loads(paths.perplexity.read_text())['tuned']['perplexity']:.4f}" in card
    assert "learning_rate" in card  # the configuration
    assert all(secret.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_push_offline_or_without_token_is_one_line(merged_run, capsys, monkeypatch):
    for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_API_KEY", "HUGGINGFACE_TOKEN"):
        monkeypatch.delenv(n, raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    rc, err = _cli(["push", "--run", merged_run, "--repo", "someone/x", "--include", "adapter"], capsys)
    assert rc == 2 and len(err) == 1 and "no Hugging Face token" in err[0]
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    rc, err = _cli(["push", "--run", merged_run, "--repo", "someone/x", "--include", "adapter"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: upload to someone/x failed"), err
    rc, err = _cli(["push", "--run", merged_run, "--repo", "not a repo"], capsys)
    assert rc == 2 and "user/name" in err[0]


@pytest.mark.long  # ~40 s: SmolLM2 converted, quantized and compared (make test-long)
def test_parity_on_the_real_smollm2_model_q4_k_m(smol_dir, session_outputs, monkeypatch):
    """SmolLM2-135M-Instruct: its real tokenizer and chat template through llama.cpp, quantized to q4_k_m."""
    from lib.data.prepare import run_prepare
    from lib.run.paths import run_paths
    from lib.ship.export import run_export

    run = "smol_export"
    run_prepare(run, str(Path(__file__).parent.parent / "data" / "examples" / "socratic_questions.jsonl"),
                profile="tiny", overrides=[f"model.name_or_path={smol_dir}", "eval.max_examples=6",
                                           "export.parity_examples=4", "generation.max_new_tokens=24"])
    shutil.copytree(smol_dir, run_paths(run).merged)
    r = run_export(run, quant="q4_k_m", progress=False)
    assert r["prompt_tokens"]["identical"] == r["prompts"] == 4
    assert r["prompt_tokens"]["identical_from_gguf_template"] == 4
    assert r["prompt_tokens"]["identical_from_modelfile_template"] == 4
    assert r["stop_tokens"]["tokens"] == ["<|im_end|>"] and r["stop_tokens"]["end_of_generation_in_gguf"]
    assert r["perplexity"]["relative_drift"] <= r["perplexity"]["tolerance"]
    assert r["ok"], r["failures"]
    assert _gguf_fields(run_paths(run).root / "export" / f"{run}-q4_k_m.gguf")["general.file_type"] == 15


def test_config_offers_exactly_the_quantization_types_export_knows():
    from lib.run.settings import CHOICES
    from lib.ship.llamacpp import QUANT_TYPES

    assert CHOICES["export.quant"] == list(QUANT_TYPES)


def test_the_parity_check_sizes_llama_cpp_context_from_what_the_model_leaves():
    """generation.max_new_tokens=2147483647 (unbounded) must not become a two-billion-position llama.cpp context:
    each greedy answer gets what the model's context leaves after its prompt, as transformers' side."""
    from lib.ship.parity import merged_context, parity_budget

    budgets, n_ctx = parity_budget([10, 1000], 2147483647, 256, 1024)
    assert budgets == [1014, 24] and n_ctx == 1000 + 24 + 1 + 8
    assert parity_budget([10], 64, 256, None) == ([64], 256 + 8)  # no context known: the setting, as before
    assert merged_context("/no/such/folder") is None
