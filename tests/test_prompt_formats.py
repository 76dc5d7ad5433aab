"""Prompt formats for base models (data.prompt_format), and the audit's template checks."""

from __future__ import annotations

import json

import pytest

from lib.data.prompts import render_prompt
from lib.data.templates import apply_prompt_format, stop_token_ids
from lib.data.tokenization import IGNORE_INDEX, encode_example
from lib.run.errors import ConfigError, DataError

CONV = {"messages": [{"role": "user", "content": "What is 2+2? Is it 4?"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}


@pytest.fixture()
def base_tokenizer(session_outputs):
    """The tiny tokenizer with its chat template removed: a base model's."""
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("fmt, prompt_end, answer", [
    ("qa", "Question: And 3+3?\nAnswer:", " 6</s>"),
    ("alpaca", "### Instruction:\nAnd 3+3?\n\n### Response:\n", "6</s>"),
    ("chatml", "<|im_start|>user\nAnd 3+3?</s>\n<|im_start|>assistant\n", "6</s>"),
])
def test_named_formats_train_exactly_the_answer_and_eos(base_tokenizer, fmt, prompt_end, answer):
    tok = base_tokenizer
    assert apply_prompt_format(tok, fmt)
    prompt = render_prompt(tok, CONV["messages"][:3])
    assert prompt.endswith(prompt_end)
    enc = encode_example(tok, CONV)
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["input_ids"][: len(full)] == full  # the last answer sits right after the generation prompt
    assert enc["labels"][n_prompt: len(full)] == full[n_prompt:]  # trained: the answer and eos, by position
    assert enc["labels"][n_prompt - 1] == IGNORE_INDEX
    assert enc["n_answers"] == enc["n_eot"] == 2
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_seed_qa_prompt_is_reproduced(base_tokenizer):
    apply_prompt_format(base_tokenizer, "qa")
    text = render_prompt(base_tokenizer, [{"role": "user", "content": "Why?"}])
    assert text == "<s>Question: Why?\nAnswer:"


def test_custom_jinja_and_a_bad_value(base_tokenizer):
    jinja = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\n' }}"
             "{% else %}{{ 'A: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    apply_prompt_format(base_tokenizer, jinja)
    assert base_tokenizer.chat_template == jinja
    enc = encode_example(base_tokenizer, CONV)
    assert enc["n_answers"] == enc["n_eot"] == 2
    with pytest.raises(ValueError, match="prompt_format"):
        apply_prompt_format(base_tokenizer, "vicuna")


def test_config_rejects_an_unknown_prompt_format():
    from lib.run.config import make_config

    with pytest.raises(ConfigError, match="data.prompt_format"):
        make_config("tiny", overrides=["data.prompt_format=vicuna"])


def test_prompt_format_is_saved_in_the_run_and_used_by_the_tokenizer(outputs):
    from lib.data.prepare import run_prepare, tokenizer_with_template_flag
    from lib.data.templates import PROMPT_FORMATS
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    report = run_prepare("qa", "data/examples/socratic_dialogues.json", profile="tiny",
                         overrides=["data.prompt_format=qa"])
    assert report["prompt_format"] == "qa" and report["end_of_turn"]["answers_without_stop"] == 0
    cfg = load_config(run_paths("qa").config)
    tok, _ = tokenizer_with_template_flag(cfg)
    assert tok.chat_template == PROMPT_FORMATS["qa"]


def _jsonl(tmp_path, rows):
    p = tmp_path / "conv.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(p)


NO_STOP = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
           "{% else %}{{ 'Bot: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'Bot:' }}{% endif %}")


def test_answers_without_a_stop_token_stop_prepare_unless_allowed(outputs, tmp_path):
    from lib.data.prepare import run_prepare

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"line \d+: 1 answer\(s\) would be trained without an end-of-turn token"):
        run_prepare("nostop", path, profile="tiny", overrides=[f"data.prompt_format={NO_STOP}"])
    report = run_prepare("nostop", path, profile="tiny",
                         overrides=[f"data.prompt_format={NO_STOP}", "data.allow_missing_stop=true"])
    assert report["end_of_turn"]["answers_without_stop"] == report["end_of_turn"]["answers"] > 0
    assert any("without an end-of-turn token" in w for w in report["warnings"])


GEMMA_LIKE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_a_refused_system_message_is_folded_and_reported(outputs, tmp_path):
    from lib.data.prepare import run_prepare

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    report = run_prepare("fold", _jsonl(tmp_path, rows), profile="tiny",
                         overrides=[f"data.prompt_format={GEMMA_LIKE}", "data.eval_fraction=0.25"])
    assert report["template"]["system_folded_examples"] == 4
    assert any("folded into the first user turn" in w for w in report["warnings"])


def test_a_refusing_template_is_one_line_naming_the_record(outputs, tmp_path):
    from lib.data.prepare import run_prepare

    strict = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 != 0 %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"},
                          {"role": "assistant", "content": "a"}]}]  # (a leading assistant turn is dropped, audited)
    with pytest.raises(DataError) as e:
        run_prepare("strict", _jsonl(tmp_path, rows), profile="tiny",
                    overrides=[f"data.prompt_format={strict}", "data.eval_fraction=0"])
    assert "line 2" in str(e.value) and "roles must alternate" in str(e.value) and "\n" not in str(e.value)

