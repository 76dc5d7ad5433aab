"""Evaluation (lib/evaluate/evaluation.py): perplexity by hand, generation, metrics on known strings, the stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import copy_run, reseal

from lib.data.templates import stop_token_ids
from lib.data.textmetrics import count_questions, generation_metrics, is_question, style_scores, text_metrics
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.evaluate.evaluation import metrics_table, metrics_verdict, predictions_table, run_evaluate
from lib.evaluate.scoring import perplexity
from lib.model.generation import generate_answers
from lib.model.loading import load_model_and_tokenizer
from lib.run.config import make_config, save_config
from lib.run.errors import MissingStageError, SFTError
from lib.run.paths import run_paths

EXAMPLES = [
    {"messages": [{"role": "user", "content": "Why does ice float on water?"},
                  {"role": "assistant", "content": "What happens to the volume of water when it freezes?"}]},
    {"messages": [{"role": "system", "content": "Ask questions."},
                  {"role": "user", "content": "What is justice?"},
                  {"role": "assistant", "content": "Who decides what is fair?\nWhy?"},
                  {"role": "user", "content": "The law decides."},
                  {"role": "assistant", "content": "Is every law fair?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Why do we greet?"}]},
    {"text": "Plain language-modelling text is trained on every token."},
    {"messages": [{"role": "user", "content": "Is this answer empty?"}, {"role": "assistant", "content": ""}]},
]


@pytest.fixture(scope="module")
def tiny():
    """The tiny base model as every stage loads it: 4-bit NF4 through load_model_and_tokenizer."""
    cfg = make_config("tiny", run="unit")
    model, tokenizer = load_model_and_tokenizer(cfg, for_training=False)
    return model, tokenizer


def _hand_perplexity(model, tokenizer, examples, max_length):
    """One example at a time, no padding: -log p(token | tokens before) summed over label != -100."""
    nll, count = 0.0, 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length)
        ids = enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        for t in range(1, len(ids)):
            if enc["labels"][t] != IGNORE_INDEX:
                nll -= logp[t - 1, ids[t]].item()
                count += 1
    return nll / count, count


@pytest.mark.parametrize("max_length", [None, 20])
def test_perplexity_matches_hand_computation(tiny, max_length):
    model, tokenizer = tiny
    loss, count = _hand_perplexity(model, tokenizer, EXAMPLES, max_length)
    # Batches of 3 mix lengths: padding must be masked, and bos/prompt/padding never scored.
    got = perplexity(model, tokenizer, EXAMPLES, batch_size=3, max_length=max_length, progress=False)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # The trained tokens are exactly the labels training sees (bos is never a label).
    assert count == sum(encode_example(tokenizer, ex, max_length)["n_trained"] for ex in EXAMPLES)
    if max_length is None:  # the empty answer still trains its end-of-turn token: one scored token
        assert perplexity(model, tokenizer, EXAMPLES[-1:], progress=False)["tokens"] == 1


class _Uniform(torch.nn.Module):
    """Equal logits everywhere: the perplexity is the vocabulary size, whatever the tokens."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_uniform_model_is_vocabulary_size(tiny):
    _, tokenizer = tiny
    got = perplexity(_Uniform(3000), tokenizer, EXAMPLES, batch_size=2, max_length=64, progress=False)
    assert got["perplexity"] == pytest.approx(3000.0, rel=1e-5)
    assert got["loss"] == pytest.approx(math.log(3000), rel=1e-6)


def test_perplexity_without_answer_tokens_is_a_clear_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(SFTError, match="no assistant tokens"):
        perplexity(model, tokenizer, [{"messages": [{"role": "user", "content": "only a question"}]}],
                   progress=False)


# ----------------------------------------------------------------------------- generation

PROMPTS = [
    [{"role": "user", "content": "Why does ice float?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the causes of war."}],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def biased_model():
    """The tiny model (fp32) with an output bias, to make it stop or never stop on purpose."""
    from transformers import AutoModelForCausalLM

    from lib.run.tiny import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = torch.nn.Parameter(old.weight.detach().clone())
    torch.nn.init.zeros_(head.bias)
    model.lm_head = head
    return model


def test_batched_generation_equals_one_at_a_time(biased_model, tiny):
    _, tokenizer = tiny
    model = biased_model
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # the random model likes newlines and special tokens: make it write text
        model.lm_head.bias.zero_()
        model.lm_head.bias[blank] = -100.0
    settings = {"max_new_tokens": 10, "do_sample": False, "repetition_penalty": 1.0}
    batched = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=3, progress=False)
    single = [generate_answers(model, tokenizer, [p], settings, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(a["text"] and not a["stopped"] for a in batched)
    assert len({a["text"] for a in batched}) > 1  # the answers depend on the prompts
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_stop_rate_of_a_model_that_stops_and_one_that_does_not(biased_model, tiny):
    _, tokenizer = tiny
    model = biased_model
    stops = stop_token_ids(tokenizer)
    what = tokenizer.convert_tokens_to_ids("What")
    settings = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 2}
    refs = ["What?"] * len(PROMPTS)

    # Stops: "What" twice, then (the 2-gram "What What" may not repeat) the end-of-turn token.
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[what] = 200.0
        model.lm_head.bias[stops[0]] = 100.0
    answers = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=2, progress=False)
    assert [a["stopped"] for a in answers] == [True] * 3
    assert [a["text"] for a in answers] == ["WhatWhat"] * 3
    assert generation_metrics(answers, refs)["stop_rate"] == 1.0

    # Never stops: the stop tokens are the least likely, so every answer runs into max_new_tokens.
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[stops] = -200.0
    answers = generate_answers(model, tokenizer, PROMPTS, settings, batch_size=2, progress=False)
    assert [a["stopped"] for a in answers] == [False] * 3
    assert all(len(tokenizer(a["text"], add_special_tokens=False)["input_ids"]) >= 5 for a in answers)
    assert generation_metrics(answers, refs)["stop_rate"] == 0.0


def test_evaluation_stops_on_the_models_own_stop_ids_too(biased_model, tiny):
    """A model's generation_config may list stops the template never writes after an answer (GLM-4.x: <|user|> and
    <|observation|>, which open the next turn): a base model not yet tuned stops there, and evaluation must too,
    else its answers run on into invented turns and the base side of the comparison is scored unfairly."""
    _, tokenizer = tiny
    model = biased_model
    what = tokenizer.convert_tokens_to_ids("What")
    assert what not in stop_token_ids(tokenizer)
    settings = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0}
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[what] = 200.0
    kept = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, what]
        answers = generate_answers(model, tokenizer, PROMPTS[:1], settings, progress=False)
        assert answers == [{"text": "", "stopped": True, "prompt_cut": False}]
        model.generation_config.eos_token_id = kept
        assert generate_answers(model, tokenizer, PROMPTS[:1], settings, progress=False)[0]["stopped"] is False
    finally:
        model.generation_config.eos_token_id = kept


# ----------------------------------------------------------------------------- metrics


def test_text_metrics_on_known_strings():
    same = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    disjoint = text_metrics(["dogs bark loudly"], ["the cat sat on the mat"])
    assert disjoint["bleu"] == pytest.approx(0.0)
    assert disjoint["rouge_l"] == pytest.approx(0.0)
    # ROUGE-L: LCS "the cat" of 3-word strings: precision = recall = 2/3.
    assert text_metrics(["the cat ran"], ["the cat sat"])["rouge_l"] == pytest.approx(2 / 3)
    # Mean over pairs: 1.0 and 0.0.
    assert text_metrics(["a b", "c d"], ["a b", "e f"])["rouge_l"] == pytest.approx(0.5)
    # Scripts without spaces are scored per character, not silently as 0.
    cjk = text_metrics(["東京は大きい"], ["東京は小さい"])
    assert 0.0 < cjk["rouge_l"] < 1.0 and cjk["bleu"] > 0.0
    assert "tok:char" in cjk["bleu_signature"]
    with pytest.raises(ValueError):
        text_metrics(["a"], [])


def test_socratic_style_scores():
    assert count_questions("Why is that? And what follows? Because.") == 2
    assert count_questions("??? !") == 0
    assert count_questions("なぜですか？どう思う？") == 2
    assert is_question("What do you mean?") and is_question('Is it "true?"')
    assert not is_question("Is it? I think so.") and not is_question("")
    s = style_scores(["Why is that?", "It is so.", "What is X? And Y?", "Is it? I think so."])
    assert s["question_rate"] == 0.5
    assert s["questions_per_answer"] == 1.0
    assert s["mean_words"] == pytest.approx((3 + 3 + 5 + 5) / 4)


# ----------------------------------------------------------------------------- the stage


def test_run_evaluate_on_the_trained_run(trained_run):
    run = copy_run(trained_run, "evaluated")  # the session run stays read-only
    paths = run_paths(run)
    result = run_evaluate(run, progress=False)
    ppl = json.loads(paths.perplexity.read_text())
    assert set(ppl) == {"base", "tuned"}
    for m in ("base", "tuned"):
        assert set(ppl[m]) >= {"loss", "perplexity", "tokens"}
        assert ppl[m]["perplexity"] == pytest.approx(math.exp(ppl[m]["loss"]))
    assert ppl["base"]["tokens"] == ppl["tuned"]["tokens"] > 0
    assert ppl["tuned"]["perplexity"] < ppl["base"]["perplexity"]  # the demo training learnt something
    assert result["perplexity"] == ppl

    # "base" is the same weights with the adapter off: equal to the base model loaded on its own.
    from lib.data.readers import read_examples
    from lib.run.config import load_config

    cfg = load_config(paths.config)
    base, tok = load_model_and_tokenizer(cfg, for_training=False)
    alone = perplexity(base, tok, read_examples(paths.eval_data), cfg.eval.batch_size, cfg.train.max_length,
                       progress=False)
    assert alone["perplexity"] == pytest.approx(ppl["base"]["perplexity"], rel=1e-5)

    rows = [json.loads(line) for line in paths.predictions.read_text().splitlines()]
    assert len(rows) == min(cfg.eval.generate_examples, len(read_examples(paths.eval_data))) == 4
    for r in rows:
        assert {"prompt", "reference", "base", "tuned", "base_stopped", "tuned_stopped"} <= set(r)
        assert r["prompt"] and r["reference"]
    gen = json.loads(paths.generation_metrics.read_text())
    assert gen["examples"] == 4
    for m in ("base", "tuned"):
        assert 0.0 <= gen[m]["bleu"] <= 100.0 and 0.0 <= gen[m]["rouge_l"] <= 1.0
        assert gen[m]["stop_rate"] == sum(r[f"{m}_stopped"] for r in rows) / 4
    assert gen["reference"]["question_rate"] == 1.0  # every Socratic reference ends with a question
    assert gen["generation"]["max_new_tokens"] == cfg.generation.max_new_tokens

    table = metrics_table(run)
    assert list(table.columns) == ["base", "tuned", "reference"]
    assert table.loc["perplexity (lower is better)", "tuned"] == pytest.approx(ppl["tuned"]["perplexity"])
    side = predictions_table(run, n=3)
    assert len(side) == 3 and list(side.columns[:4]) == ["prompt", "reference", "base", "tuned"]
    # notebook 04's view: a change column with its direction, shares as percentages, no empty tool-call rows,
    # a verdict line; answers cut at max_new_tokens (from the token ids: not stopped) marked
    view = metrics_table(run, styled=True).data
    assert list(view.columns) == ["base", "tuned", "change"] and not any("tool calls" in r for r in view.index)
    assert view.loc["answers that stop on their own (end-of-turn)", "tuned"].endswith("%")
    assert view.loc["perplexity (lower is better)", "change"].endswith(("(better)", "(worse)", "(same)"))
    line = metrics_verdict(run)  # perplexity said for what it is: no proof that the answers are right
    assert line.startswith("Perplexity ") and "the verdict table above" in line and "worked" not in line
    shown = predictions_table(run, 4, styled=True).data
    for m in ("base", "tuned"):
        assert [("[… cut at max_new_tokens=" in t) for t in shown[m]] == [not r[f"{m}_stopped"] for r in rows]

    # Overrides: no generation, fewer examples; files are replaced consistently.
    again = run_evaluate(run, overrides=["eval.generate_examples=0", "eval.max_examples=3"], progress=False)
    assert again["generation"] is None and again["predictions"] == []
    assert json.loads(paths.generation_metrics.read_text())["examples"] == 0
    assert paths.predictions.read_text() == ""
    assert again["perplexity"]["tuned"]["examples"] == 3


def test_missing_inputs_name_the_notebook_to_run(outputs):
    from lib.__main__ import main

    with pytest.raises(MissingStageError, match="01_prepare_data"):
        run_evaluate("nothing")
    cfg = make_config("tiny", run="untrained")
    paths = run_paths("untrained")
    save_config(cfg, paths.config)
    paths.data_dir.mkdir()
    paths.eval_data.write_text(json.dumps(EXAMPLES[0]) + "\n")
    with pytest.raises(MissingStageError, match="03_train_sft"):
        run_evaluate("untrained")
    paths.adapter.mkdir()  # a folder without an adapter in it
    with pytest.raises(MissingStageError, match="03_train_sft"):
        run_evaluate("untrained")
    assert main(["evaluate", "--run", "untrained"]) == 2
    assert not paths.eval_dir.exists()  # nothing half-written


# ----------------------------------------------------------------------------- long prompts


def test_cut_prompt_keeps_the_end_and_a_leading_bos():
    from lib.model.generation import cut_prompt

    assert cut_prompt(list(range(10)), 4, bos_token_id=0) == [0, 7, 8, 9]
    assert cut_prompt(list(range(1, 11)), 4, bos_token_id=0) == [7, 8, 9, 10]
    assert cut_prompt(list(range(10)), 10, bos_token_id=0) == list(range(10))
    assert cut_prompt(list(range(10)), None) == list(range(10))


def test_a_long_generation_prompt_is_cut_to_its_last_max_length_tokens(biased_model, tiny):
    from lib.data.prompts import render_prompt
    from lib.model.generation import cut_prompt

    _, tokenizer = tiny
    model = biased_model
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[blank] = -100.0
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(3000))}]
    prompts = [long, PROMPTS[0]]
    settings = {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.0}
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        answers = generate_answers(model, tokenizer, prompts, settings, batch_size=2, progress=False, max_length=64)
    finally:
        hook.remove()
    assert seen[0] == 64  # the first forward pass sees at most max_length prompt tokens
    assert [a["prompt_cut"] for a in answers] == [True, False]
    # The long prompt's answer is the answer to its cut ids, token by token.
    ids = tokenizer(render_prompt(tokenizer, long), add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    cut = cut_prompt(ids, 64, tokenizer.bos_token_id)
    assert cut[-20:] == ids[-20:] and len(cut) == 64
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([cut]), attention_mask=torch.ones(1, 64, dtype=torch.long),
                             max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(tokenizer))
    expected = tokenizer.decode(out[0, 64:].tolist(), skip_special_tokens=True).strip()
    assert answers[0]["text"] == expected
    # The short prompt is answered as without a limit.
    assert answers[1] == generate_answers(model, tokenizer, [PROMPTS[0]], settings, progress=False)[0]


def test_run_evaluate_counts_cut_prompts(trained_run):
    run = copy_run(trained_run, "longprompt")
    paths = run_paths(run)
    rows = paths.eval_data.read_text(encoding="utf-8").splitlines()
    long = {"messages": [{"role": "user", "content": "why " * 5000}, {"role": "assistant", "content": "Why not?"}]}
    paths.eval_data.write_text("\n".join([json.dumps(long)] + rows[:2]) + "\n", encoding="utf-8")
    reseal(run, "prepare", "train")
    run_evaluate(run, overrides=["eval.generate_examples=2", "generation.max_new_tokens=4"], progress=False)
    gen = json.loads(paths.generation_metrics.read_text(encoding="utf-8"))
    assert gen["prompts_cut"] == 1 and gen["max_length"] == 256
    predictions = [json.loads(x) for x in paths.predictions.read_text(encoding="utf-8").splitlines()]
    assert [p["prompt_cut"] for p in predictions] == [True, False]
    ppl = json.loads(paths.perplexity.read_text(encoding="utf-8"))
    assert ppl["tuned"]["examples_cut"] == 1 and ppl["base"]["examples_cut"] == 1


def test_damaged_tokenizer_in_the_adapter_is_blamed_on_the_adapter(trained_run, capsys):
    from lib.__main__ import main

    run = copy_run(trained_run, "notokenizer")
    adapter = run_paths(run).adapter
    (adapter / "tokenizer.json").unlink()
    assert main(["evaluate", "--run", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # the train manifest records the adapter's tokenizer files: the missing one is named, with the stage to rerun
    assert err.startswith(f"error: {adapter}/tokenizer.json is missing (written by train): rerun notebook 03")
    assert "model.name_or_path" not in err

