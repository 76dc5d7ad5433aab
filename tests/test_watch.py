"""Watching a run learn: the answers sampled while training (logs/samples.jsonl and the sample_* columns of
the metrics CSV), the comparison of runs (`python -m lib compare`), and the forgetting check of evaluate."""

from __future__ import annotations

import json
import math

import pytest
from conftest import copy_run

from lib.__main__ import main
from lib.run.config import apply_overrides, load_config, save_config
from lib.run.paths import RunPaths, run_paths


def _rows_by_step(path) -> dict[int, list[dict]]:
    from lib.train.samples import read_samples

    out: dict[int, list[dict]] = {}
    for r in read_samples(path):
        out.setdefault(r["step"], []).append(r)
    return out


# ----------------------------------------------------------------------------- answers during training


def test_samples_at_step_0_and_every_evaluation_scored_as_evaluate_scores(trained_run):
    """The fixture run (tiny profile: 2 prompts, 8 new tokens): answers at step 0 and at each evaluation; with
    the adapter of the last one they are the evaluation stage's own answers (same prompts, the run's stop
    tokens, greedy) and the CSV's sample_* figures are its generation metrics."""
    import shutil

    from conftest import reseal

    from lib.evaluate.evaluation import run_evaluate
    from lib.evaluate.summary import before_after
    from lib.train.samples import samples_table
    from lib.train.trainer import read_metrics_rows

    paths = run_paths(trained_run)
    cfg = load_config(paths.config)
    csv_rows = read_metrics_rows(paths.metrics_csv)
    eval_steps = {int(r["step"]) for r in csv_rows if r["eval_loss"]}
    by_step = _rows_by_step(paths.samples)
    assert set(by_step) == eval_steps and 0 in eval_steps and len(eval_steps) >= 3
    assert all(len(rows) == cfg.eval.sample_prompts == 2 for rows in by_step.values())
    sampled = {int(r["step"]): r for r in csv_rows if r["sample_bleu"]}
    assert set(sampled) == set(by_step)

    # The adapter of the last sampled step, evaluated on the same prompts with the same settings.
    last = max(by_step)
    run = copy_run(trained_run, "watch-eval")
    adapter = run_paths(run).adapter / "adapter_model.safetensors"
    shutil.copyfile(run_paths(run).checkpoints / f"checkpoint-{last}" / "adapter_model.safetensors", adapter)
    reseal(run, "train")
    overrides = ["eval.max_examples=2", "eval.general_prompts=data/general_prompts.jsonl", "eval.general_examples=4",
                 f"eval.generate_examples={cfg.eval.sample_prompts}",
                 f"generation.max_new_tokens={cfg.eval.sample_max_new_tokens}", "generation.do_sample=false"]
    result = run_evaluate(run, overrides=overrides, progress=False)
    final = sorted(by_step[last], key=lambda r: r["index"])
    assert [(p["prompt"], p["tuned"], p["tuned_stopped"]) for p in result["predictions"]] == \
        [(r["prompt"], r["answer"], r["stopped"]) for r in final]
    tuned = result["generation"]["tuned"]
    for column in ("stop_rate", "question_rate", "questions_per_answer", "mean_words", "bleu", "rouge_l"):
        assert float(sampled[last][f"sample_{column}"]) == pytest.approx(tuned[column], rel=1e-9, abs=1e-12)

    # The forgetting check ran with it and the summary says it in words.
    forgetting = json.loads(run_paths(run).forgetting.read_text())
    assert forgetting["prompts"] == 4 and math.isfinite(forgetting["ratio"]) and forgetting["mean_kl"] >= 0
    assert "forgetting check" in before_after(run) and "likely" in forgetting["reading"]

    table = samples_table(trained_run)
    assert list(table.columns) == ["prompt", "reference", "step 0", f"step {sorted(by_step)[len(by_step) // 2]}",
                                   f"step {last}"] and len(table) == 2


def test_a_resumed_training_drops_the_samples_after_its_checkpoint(outputs):
    """Rows after the checkpoint resumed from are dropped (they are sampled again), as in the metrics CSV."""
    from lib.run.config import make_config
    from lib.train.samples import SamplesCallback, read_samples

    paths = RunPaths(outputs / "r")
    paths.samples.parent.mkdir(parents=True)
    row = {"index": 0, "prompt": "p", "reference": "r", "answer": "a", "stopped": True}  # as SamplesCallback writes
    paths.samples.write_text("".join(json.dumps({"step": s, **row}) + "\n" for s in (0, 10, 20))
                             + '{"step": 30, "ind', encoding="utf-8")  # a torn last line of a killed run
    cb = SamplesCallback(make_config("tiny"), None, paths, resume_step=10)
    assert [r["step"] for r in read_samples(paths.samples)] == [0, 10] and cb.done == {0, 10}
    SamplesCallback(make_config("tiny"), None, paths, resume_step=None)  # a fresh start empties it
    assert read_samples(paths.samples) == []


# ----------------------------------------------------------------------------- compare


def test_compare_two_runs_shows_exactly_the_changed_settings_and_writes_nothing(trained_run, tmp_path, capsys):
    a, b = copy_run(trained_run, "cmp-a"), copy_run(trained_run, "cmp-b")
    changed = {"train.learning_rate": 0.001, "lora.r": 8, "generation.repetition_penalty": 1.3}
    cfg = apply_overrides(load_config(run_paths(b).config), [f"{k}={v}" for k, v in changed.items()])
    save_config(cfg, run_paths(b).config)
    before = {p: p.stat().st_mtime_ns for r in (a, b) for p in run_paths(r).root.rglob("*") if p.is_file()}

    from lib.evaluate.compare import compare_runs, results_table, settings_diff

    runs = compare_runs([a, b])
    diff = settings_diff(runs)
    assert set(diff.index) == set(changed)
    assert all(diff.loc[k, b] == v for k, v in changed.items())
    assert "evaluation" in " ".join(runs[0].missing)  # the fixture run is trained, not evaluated
    assert results_table(runs).loc["last eval loss", a] == results_table(runs).loc["last eval loss", b]

    figure = tmp_path / "curves.png"
    assert main(["compare", a, b, "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "Settings that differ" in out and "lora.r" in out and "missing evaluation" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = {p: p.stat().st_mtime_ns for r in (a, b) for p in run_paths(r).root.rglob("*") if p.is_file()}
    assert after == before, "compare wrote into a run"

    assert main(["compare", a, "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run 'no-such-run'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- forgetting


def test_forgetting_is_1_for_the_base_model_against_itself(prepared_run):
    """No adapter (or an adapter that changes nothing): ratio 1.0, KL 0; a bad prompts file is one line."""
    from lib.evaluate.forgetting import compare_models, load_general_prompts
    from lib.model.loading import load_model_and_tokenizer
    from lib.run.errors import ConfigError, DataError

    cfg = load_config(run_paths(prepared_run).config)
    model, tok = load_model_and_tokenizer(cfg, for_training=False)
    prompts = load_general_prompts("data/general_prompts.jsonl")
    assert len(prompts) >= 30
    examples = [{"messages": p + [{"role": "assistant", "content": "Paris is the capital of France."}]}
                for p in prompts[:6]]
    result = compare_models(model, tok, examples, batch_size=4, max_length=cfg.train.max_length, progress=False)
    assert result["ratio"] == 1.0 and result["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["base_perplexity"] == result["tuned_perplexity"] > 1.0

    with pytest.raises(ConfigError, match="not a file"):
        load_general_prompts("no/such/prompts.jsonl")
    bad = run_paths(prepared_run).root.parent / "bad_prompts.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_general_prompts(bad)
    bad.write_text('{"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'messages\[0\]'"):  # a message without content
        load_general_prompts(bad)


@pytest.mark.slow
def test_forgetting_rises_on_a_smol_run_trained_to_overfit(smol_dir, outputs):
    """SmolLM2 with a LoRA adapter trained a few steps at a high learning rate on two Socratic examples: the
    base model's general answers (made with the adapter off, cached) become clearly less likely."""
    import torch

    from lib.data.tokenization import encode_example
    from lib.evaluate.forgetting import base_answers, forgetting_check, load_general_prompts
    from lib.evaluate.scoring import padded_batch
    from lib.model.configure import with_lora
    from lib.model.loading import load_model_and_tokenizer
    from lib.run.config import make_config

    cfg = make_config("smol", overrides=["quant.mode=none", "eval.general_examples=3",
                                         "eval.general_max_new_tokens=12", "train.max_length=64"])
    model, tok = load_model_and_tokenizer(cfg, for_training=True)
    model = with_lora(model, cfg)
    paths = RunPaths(outputs / "smol-forget")
    base_answers(model, tok, cfg, paths, load_general_prompts(cfg.eval.general_prompts)[:3], progress=False)

    from conftest import SAMPLE

    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:2]]
    encoded = [encode_example(tok, {"messages": [{"role": "user", "content": r["instruction"]},
                                                 {"role": "assistant", "content": "\n".join(r["output"])}]}, 64)
               for r in records]
    ids, labels, mask = padded_batch(encoded, tok.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    cached = paths.forgetting_base.stat().st_mtime_ns
    after = forgetting_check(model, tok, cfg, paths, progress=False)
    assert paths.forgetting_base.stat().st_mtime_ns == cached  # the base answers came from the cache
    assert after["ratio"] > 1.2 and after["mean_kl"] > 0.05, after
    assert "less likely" in after["reading"]
