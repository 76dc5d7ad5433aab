"""Assistant-only labels: the trained tokens of every example decode to exactly the assistant
contents plus their end-of-turn tokens, on multi-turn data, for several chat templates
(the tiny model's, ChatML without {% generation %} markers, Llama-3 and Gemma styles)."""

from __future__ import annotations

import pytest

from lib.data.templates import end_of_turn_token, stop_token_ids
from lib.data.tokenization import IGNORE_INDEX, encode_example

CHATML = (  # Qwen2.5-style: a default system message, no generation markers
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3 = (  # contents are trimmed, the header is followed by a blank line, <|eot_id|> ends a turn
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
GEMMA = (  # the assistant is called "model", no system role
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {
    # name: (template or None for the tiny model's own, special tokens to add, end of turn, trims content)
    "tiny": (None, [], "</s>", False),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", False),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", True),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", True),
}


@pytest.fixture(scope="module")
def tiny_tokenizer_path(session_outputs):
    from lib.run.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="module", params=list(TEMPLATES))
def templated(request, tiny_tokenizer_path):
    """(name, tokenizer with that chat template, its end-of-turn token, whether contents are trimmed)."""
    from transformers import AutoTokenizer

    template, specials, eot, trims = TEMPLATES[request.param]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    if template is not None:
        tok.add_tokens(specials, special_tokens=True)
        tok.chat_template = template
    return request.param, tok, eot, trims


@pytest.fixture(scope="module")
def multi_turn_examples():
    from lib.data.examples import prepare_examples
    from lib.run.paths import REPO_ROOT

    out = []
    for name in ("socratic_dialogues.json", "sharegpt_conversations.jsonl"):
        prepared = prepare_examples(str(REPO_ROOT / "data" / "examples" / name), eval_fraction=0.0)
        out += prepared.train
    multi = [ex for ex in out if sum(m["role"] == "assistant" for m in ex["messages"]) >= 2]
    assert len(multi) >= 3, "the sample data should hold multi-turn conversations"
    return out


def trained_spans(tokenizer, enc) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tid, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tid, "a trained label must be the token itself"
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def expected_spans(example, eot, trims) -> list[str]:
    return [(m["content"].strip() if trims else m["content"]) + eot
            for m in example["messages"] if m["role"] == "assistant"]


def test_end_of_turn_token_of_each_template(templated):
    name, tok, eot, _ = templated
    assert end_of_turn_token(tok) == eot
    assert tok.convert_tokens_to_ids(eot) in stop_token_ids(tok)


def test_trained_spans_are_the_assistant_answers_plus_end_of_turn(templated, multi_turn_examples):
    name, tok, eot, trims = templated
    n_answers = 0
    for ex in multi_turn_examples:
        enc = encode_example(tok, ex, max_length=None)
        assert trained_spans(tok, enc) == expected_spans(ex, eot, trims), name
        assert enc["n_eot"] == enc["n_answers"] == len(expected_spans(ex, eot, trims))
        n_answers += enc["n_answers"]
    assert n_answers > len(multi_turn_examples)  # multi-turn: more answers than conversations


def test_prepared_examples_of_the_pipeline(prepared_run):
    """The run's own train.jsonl (made by run_prepare), tokenized as training does."""
    from lib.data.readers import read_examples
    from lib.data.tokenizer import load_tokenizer
    from lib.run.config import load_config
    from lib.run.paths import run_paths

    paths = run_paths(prepared_run)
    cfg = load_config(paths.config)
    tok = load_tokenizer(cfg)
    eot = end_of_turn_token(tok)
    examples = read_examples(paths.train_data)
    assert examples
    for ex in examples:
        enc = encode_example(tok, ex, max_length=None)
        assert trained_spans(tok, enc) == expected_spans(ex, eot, False)


def test_truncation_cuts_labels_with_the_tokens(templated, multi_turn_examples):
    name, tok, eot, trims = templated
    ex = max(multi_turn_examples, key=lambda e: len(e["messages"]))
    full = encode_example(tok, ex, max_length=None)
    cut = encode_example(tok, ex, max_length=full["length"] // 2)
    assert len(cut["input_ids"]) == len(cut["labels"]) == full["length"] // 2
    assert cut["input_ids"] == full["input_ids"][: full["length"] // 2]
    assert cut["labels"] == full["labels"][: full["length"] // 2]
    assert cut["n_cut"] >= 1 and full["n_cut"] == 0
    assert cut["length"] == full["length"]


def test_plain_text_trains_every_token_after_bos(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    enc = encode_example(tok, {"text": "Why does ice float on water?"})
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"][-1] == tok.eos_token_id
    assert enc["labels"][0] == IGNORE_INDEX and enc["labels"][1:] == enc["input_ids"][1:]
    assert tok.decode(enc["labels"][1:]) == "Why does ice float on water?</s>"
