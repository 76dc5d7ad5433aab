"""SmolLM2-135M-Instruct, the real model, trained end to end on a task of its own: did it help?

One run (about 4-5 minutes on 2 CPU cores, so it is `make test-long`, outside `make test`'s budget)
serves every test here: 30 steps on 176 records of data/examples/extract_json.jsonl (a sentence about
a person in, their name, age, city and job as JSON out; data/make_extract_json.py), then evaluate
with the null control, then merge. What only a real model shows:

* the base model writes no right JSON for the 24 held-out sentences, the tuned one does: the `json`
  score is `better` with its whole 95% interval above zero, from 24 answers;
* the null control (the adapter at its initial weights) shows no detectable change on every score;
* the eval perplexity falls from a real baseline (a pretrained model, far better than chance);
* pad == eos (<|im_end|>) and the tuned model still stops on its own;
* the merged model, loaded with plain transformers, answers token by token as the adapter does;
* the summary leads with the verdict's sentence and shows its rows.
"""

from __future__ import annotations

import json

import pytest

from lib.__main__ import main

pytestmark = pytest.mark.long

EXTRACT = "data/examples/extract_json.jsonl"
SMOL_TASK = ["train.max_steps=30", "train.learning_rate=1e-3", "train.eval_strategy=steps", "train.eval_steps=30",
             "train.save_steps=30", "train.logging_steps=10", "eval.sample_prompts=0", "eval.general_prompts=None",
             "data.eval_fraction=0.12", "generation.max_new_tokens=40", "eval.batch_size=12"]


@pytest.fixture(scope="module")
def smol_run(smol_dir):
    """SmolLM2 through every stage: prepare, train, evaluate (with the null control), merge (read-only)."""
    from lib.data.prepare import run_prepare
    from lib.evaluate.evaluation import run_evaluate
    from lib.ship.merge import run_merge
    from lib.train.training import run_train

    run = "smol_json"
    run_prepare(run, EXTRACT, profile="smol", overrides=SMOL_TASK)
    run_train(run)
    run_evaluate(run, progress=False, null_control=True)
    run_merge(run)
    return run


def test_smollm2_learns_the_json_task_better_with_its_interval_above_zero_and_the_null_control_holds(smol_run):
    from lib.run.paths import run_paths

    paths = run_paths(smol_run)
    summary = json.loads(paths.training_summary.read_text())
    assert summary["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A real baseline: a pretrained model predicts the answers far better than chance (ln 49152 = 10.8 nats).
    assert 0.1 < summary["initial_eval_loss"] < 6.0
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    verdict = json.loads(paths.verdict.read_text())
    assert verdict["scores"] == ["json", "json_valid", "json_keys"], verdict["why"]
    rows = {r["metric"]: r for r in verdict["rows"]}
    exact_json = rows["json"]
    assert exact_json["n"] == 24 and exact_json["base"] <= 0.25, exact_json
    assert exact_json["verdict"] == "better" and exact_json["ci95"][0] > 0, exact_json
    assert rows["perplexity"]["verdict"] == "better"
    control = json.loads((paths.verdict.parent / "null_control.json").read_text())
    task = [r for r in control["rows"] if r["kind"] == "task"]
    assert task and all(r["verdict"] == "no detectable change" for r in task), task
    gen = json.loads(paths.generation_metrics.read_text())
    assert gen["tuned"]["stop_rate"] >= 0.9  # pad == eos, and the stop token is still trained
    predictions = [json.loads(line) for line in paths.predictions.read_text().splitlines()]
    assert sum(r["tuned_stopped"] for r in predictions) == round(gen["tuned"]["stop_rate"] * len(predictions))
    print(verdict["sentence"])


def merged_and_adapter_answers(run: str, n: int = 2, max_new_tokens: int = 40):
    """Greedy token ids of the merged model (loaded with plain transformers) and of the same 16-bit base
    with the adapter unmerged, for the first `n` eval prompts, under one explicit generation config
    (the merged folder's own config carries the run's repetition penalty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lib.data.prompts import prompt_messages
    from lib.data.readers import read_examples
    from lib.model.loading import load_16bit_with_adapter
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(run)
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(paths.merged)
    adapter = load_16bit_with_adapter(load_config(paths.config), paths.adapter).eval()
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = []
    for ex in read_examples(paths.eval_data)[:n]:
        prompt, _ = prompt_messages(ex["messages"])
        enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            a = merged.generate(**enc, generation_config=gc)[0, enc["input_ids"].shape[1]:]
            b = adapter.generate(**enc, generation_config=gc)[0, enc["input_ids"].shape[1]:]
        out.append((a.tolist(), b.tolist()))
    return merged, tok, out


def test_smol_merged_loads_with_plain_transformers_and_answers_as_the_adapter(smol_run):
    from lib.run.paths import run_paths

    merged, tok, answers = merged_and_adapter_answers(smol_run)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for a, b in answers:
        assert len(a) > 0 and a == b  # token by token, the same answer
    stops = merged.generation_config.eos_token_id
    assert tok.eos_token_id in (stops if isinstance(stops, list) else [stops])  # stops on <|im_end|>
    report = json.loads(run_paths(smol_run).merge_report.read_text())
    assert report["logits"]["max_abs_diff_vs_unmerged"] < 1e-3


def test_smol_summary_leads_with_the_verdict_and_shows_before_and_after(smol_run, capsys):
    from lib.run.paths import run_paths

    assert main(["summary", "--run", smol_run]) == 0
    out = capsys.readouterr().out
    verdict = json.loads(run_paths(smol_run).verdict.read_text())
    assert out.strip().splitlines()[2].startswith(verdict["sentence"][:40])  # the summary leads with the verdict
    rows = {r["metric"]: r for r in verdict["rows"]}
    line = next(ln for ln in out.splitlines() if "perplexity of the eval answers" in ln)
    ppl = rows["perplexity"]
    assert f"{ppl['base']:.3g}" in line and f"{ppl['tuned']:.3g}" in line and line.split()[-1] == ppl["verdict"].split()[-1]
    line = next(ln for ln in out.splitlines() if "stop on their own" in ln)
    stop = rows["stop_rate"]
    assert f"{100 * stop['base']:.0f}%" in line and f"{100 * stop['tuned']:.0f}%" in line
    assert "Prompt: " in out and "  base " in out and "  tuned " in out
