"""Merge (lib/ship/merge.py): the merged model, its check report, the template round trip, refusals.

Stated tolerances on the tiny trained model (merged 16-bit vs the 4-bit adapter model training
used): relative perplexity drift within merge.tolerance (1%), top-1 agreement >= 95% and
max |logit difference| <= 0.1 on the answer tokens; merged vs the same 16-bit base with the
adapter unmerged (the merge arithmetic alone): max |logit difference| <= 1e-4 in fp32.
Measured when written: drift ~0.01%, 99.7% agreement, max diff ~0.02 vs adapter, ~4e-7 vs unmerged.
"""

from __future__ import annotations

import json

import pytest
from conftest import copy_run

from lib.run.errors import MissingStageError

TOP1_MIN = 0.95
MAX_LOGIT_DIFF = 0.1
MAX_MERGE_DIFF = 1e-4


@pytest.fixture(scope="module")
def merged_run(trained_run):
    """A copy of the trained run, merged once (with an eval/perplexity.json for merge to extend)."""
    from lib.run.paths import run_paths
    from lib.ship.merge import run_merge

    run = copy_run(trained_run, "merge_copy")
    paths = run_paths(run)
    if not paths.perplexity.exists():
        paths.eval_dir.mkdir(exist_ok=True)
        paths.perplexity.write_text(json.dumps({"base": {"perplexity": 1.0}, "tuned": {"perplexity": 1.0}}))
    report = run_merge(run)
    return run, report


def test_merge_writes_a_complete_folder(merged_run):
    from transformers import GenerationConfig

    from lib.data.templates import end_of_turn_token, stop_token_ids
    from lib.run.paths import run_paths

    run, report = merged_run
    paths = run_paths(run)
    names = {p.name for p in paths.merged.iterdir()}
    assert "model.safetensors" in names or any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(".bin") for n in names)
    assert {"config.json", "generation_config.json", "merge_report.json", "tokenizer_config.json"} <= names
    assert "adapter_config.json" not in names  # a plain model, no adapter left
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".merged")]  # no temp folder left
    assert json.loads(paths.merge_report.read_text()) == report

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.merged)
    assert tok.chat_template == AutoTokenizer.from_pretrained(paths.adapter).chat_template
    eos = GenerationConfig.from_pretrained(paths.merged).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.convert_tokens_to_ids(end_of_turn_token(tok)) in eos
    assert set(stop_token_ids(tok)) <= set(eos) and report["eos_token_id"] == eos
    # the merged model's perplexity stays in merge's own report: evaluate's results are left as evaluate wrote them
    ppl = json.loads(paths.perplexity.read_text())
    assert "merged" not in ppl and "base" in ppl and "tuned" in ppl
    assert report["perplexity"]["merged"]["perplexity"] > 0


def test_report_holds_the_figures(merged_run):
    _, r = merged_run
    merged, adapter = r["perplexity"]["merged"], r["perplexity"]["adapter"]
    assert merged["tokens"] == adapter["tokens"] > 0 and r["examples"] > 0 and r["split"] == "eval"
    assert r["relative_drift"] == pytest.approx(abs(merged["perplexity"] - adapter["perplexity"]) / adapter["perplexity"])
    assert r["ok"] is True and r["warnings"] == []
    assert r["relative_drift"] <= r["tolerance"] == 0.01
    lg = r["logits"]
    assert lg["samples"] > 0 and lg["positions"] > 0
    assert lg["top1_agreement_vs_adapter"] >= TOP1_MIN
    assert 0 < lg["max_abs_diff_vs_adapter"] <= MAX_LOGIT_DIFF  # > 0: the base really was quantized
    assert lg["max_abs_diff_vs_unmerged"] <= MAX_MERGE_DIFF and lg["top1_agreement_vs_unmerged"] == 1.0
    assert r["merged_dtype"] == "float32" and r["adapter_base_quantization"] == "4-bit"
    assert r["template"] == {"ok": True, "conversations": r["examples"], "mismatches": []}
    assert "quantization error" in r["meaning"]


def test_merged_loads_by_path_and_matches_the_adapter_model(merged_run):
    """Independently of the report: AutoModelForCausalLM on merged/ vs 4-bit base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.data.readers import read_examples
    from lib.evaluate.scoring import perplexity
    from lib.model.loading import load_tuned_model
    from lib.run.config import load_config
    from lib.run.paths import run_paths
    from lib.ship.merge import answer_logits, quantization_of

    run, report = merged_run
    paths = run_paths(run)
    cfg = load_config(paths.config)
    examples = read_examples(paths.eval_data)[:6]
    merged = AutoModelForCausalLM.from_pretrained(paths.merged)
    tok = AutoTokenizer.from_pretrained(paths.merged)
    assert quantization_of(merged) is None and merged.dtype == torch.float32
    adapter_model, _ = load_tuned_model(cfg, paths.adapter)
    assert quantization_of(adapter_model) == "4-bit"
    a = perplexity(merged, tok, examples, 4, cfg.train.max_length, progress=False)
    b = perplexity(adapter_model, tok, examples, 4, cfg.train.max_length, progress=False)
    assert a["tokens"] == b["tokens"]
    assert abs(a["perplexity"] - b["perplexity"]) / b["perplexity"] <= cfg.merge.tolerance
    la = answer_logits(merged, tok, examples[:3], cfg.train.max_length)
    lb = answer_logits(adapter_model, tok, examples[:3], cfg.train.max_length)
    x, y = torch.cat(la), torch.cat(lb)
    assert (x - y).abs().max().item() <= MAX_LOGIT_DIFF
    assert (x.argmax(-1) == y.argmax(-1)).float().mean().item() >= TOP1_MIN


def test_merged_loads_without_this_project(merged_run, tmp_path):
    """merged/ names no attention of ours (training may use lib.run.attention): plain transformers loads it."""
    import os
    import subprocess
    import sys

    from lib.run.paths import run_paths

    run, _ = merged_run
    code = ("from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(run_paths(run).merged)!r}); "
            "print(m.config._attn_implementation)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "sdpa"


def test_merging_into_a_4bit_base_is_refused(trained_run):
    from lib.model.loading import load_tuned_model
    from lib.run.config import load_config
    from lib.run.paths import run_paths
    from lib.ship.merge import MergeError, merge_adapter

    paths = run_paths(trained_run)
    model, _ = load_tuned_model(load_config(paths.config), paths.adapter)
    with pytest.raises(MergeError, match=r"refusing to merge the adapter into a 4-bit quantized base.*16-bit"):
        merge_adapter(model)
    # nothing was merged: the adapter layers are still there
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_template_round_trip_catches_a_different_template(merged_run):
    from transformers import AutoTokenizer

    from lib.data.readers import read_examples
    from lib.run.paths import run_paths
    from lib.ship.merge import template_round_trip

    paths = run_paths(merged_run[0])
    examples = read_examples(paths.eval_data)[:3]
    ref = AutoTokenizer.from_pretrained(paths.adapter)
    same = template_round_trip(ref, AutoTokenizer.from_pretrained(paths.merged), examples)
    assert same == {"ok": True, "conversations": 3, "mismatches": []}
    other = AutoTokenizer.from_pretrained(paths.merged)
    other.chat_template = "Conversation:\n" + ref.chat_template
    assert other.chat_template != ref.chat_template
    diff = template_round_trip(ref, other, examples)
    assert not diff["ok"] and any("render differ" in m for m in diff["mismatches"])


@pytest.mark.parametrize("waived", [False, True])
def test_drift_beyond_tolerance_fails_the_gate_with_exit_1(trained_run, waived, capsys):
    """A failed merge check exits 1 with one line naming the figure and the tolerance; an explicit
    merge.fail_on_drift=false turns it into a warning (exit 0). Each case merges its own copy."""
    from lib.__main__ import main
    from lib.run.paths import run_paths
    from lib.ship.merge import gate_failure

    run = copy_run(trained_run, f"merge_gate_{waived}")
    args = ["merge", "--run", run, "--set", "merge.tolerance=1e-12"]
    if waived:
        with pytest.warns(UserWarning, match="drifts .* beyond merge.tolerance=1e-12"):
            assert main(args + ["--set", "merge.fail_on_drift=false"]) == 0
    else:
        assert main(args) == 1
    out, err = capsys.readouterr()
    assert "WARNING: merge check failed" in out and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]  # (the rest: progress bars)
    if waived:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("error: merge check failed: merged model's perplexity drifts")
        assert "beyond merge.tolerance=1e-12" in lines[0] and "merge.fail_on_drift=false" in lines[0]
    report = json.loads(run_paths(run).merge_report.read_text())  # kept for inspection either way
    assert report["ok"] is False and report["tolerance"] == 1e-12 and report["fail_on_drift"] is (not waived)
    assert (gate_failure(report) is None) is waived


def test_missing_adapter_stops_with_the_notebook_to_run(outputs, capsys):
    from lib.__main__ import main
    from lib.run.config import make_config, save_config
    from lib.run.paths import run_paths
    from lib.ship.merge import run_merge

    save_config(make_config("tiny", run="noadapter"), run_paths("noadapter").config)
    with pytest.raises(MissingStageError, match="03_train_sft"):
        run_merge("noadapter")
    assert main(["merge", "--run", "noadapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter" in err and "Traceback" not in err
    assert not run_paths("noadapter").merged.exists()
