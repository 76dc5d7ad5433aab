"""Assistant-only labels on real chat templates, checked by position against an oracle.

tests/templates/*.json hold chat templates of 30+ model families copied verbatim from public
sources (each file names its source), with the model's real special tokens and the end-of-turn
token it writes after earlier answers and after the final one. Each template is put on the tiny
tokenizer with those special tokens added (so they tokenize atomically), and on SmolLM2's real
tokenizer; stress conversations (answers repeated in the prompt, short answers, empty answers,
whitespace, system messages, 3+ turns, CJK, reasoning blocks) are encoded with
lib.data.tokenization and compared token by token with the oracle below, which uses none of the
project's code: it finds each answer by rendering the conversation with the answer replaced by
a character it does not contain and diffing, takes the stop token from the template's data file,
and maps characters to tokens through the tokenizer's offsets. Every template x case is either
exactly right or a one-line TemplateError that the oracle agrees is unavoidable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import render_diff

from lib.data.templates import TemplateError, stop_token_ids
from lib.data.tokenization import IGNORE_INDEX, encode_example, split_for_template

TEMPLATE_DIR = Path(__file__).parent / "templates"
SPECS = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(TEMPLATE_DIR.glob("*.json"))}
FOLD = "\n\n"  # how a refused system message joins the first user turn

U, A, S = "user", "assistant", "system"
CASES = {
    "answer_in_prompt": [(U, "Is the answer yes or no? Reply yes if 2+2 is 4."), (A, "yes"),
                         (U, "Say Paris. Then say 4."), (A, "Paris. 4")],
    "short_answers": [(U, "What is 2+2? (4 or 5)"), (A, "4"), (U, "Capital of France? Paris. or Lyon?"),
                      (A, "Paris."), (U, "Sure? yes/no"), (A, "yes")],
    "system_message": [(S, "You are terse: answer yes or 4."), (U, "Is 4 even? yes?"), (A, "yes"),
                       (U, "2+2?"), (A, "4")],
    "empty_answer": [(U, "Say nothing."), (A, ""), (U, "Now say yes."), (A, "yes")],
    "whitespace": [(U, "Pad your answer."), (A, "  spaced answer \n"), (U, "Again, with newlines."), (A, "\nline one\n")],
    "three_turns": [(S, "Be brief."), (U, "One?"), (A, "1"), (U, "Two?"), (A, "2"), (U, "Three?"), (A, "3")],
    "cjk": [(U, "日本の首都は？東京ですか？"), (A, "東京です。"), (U, "中国的首都是哪里？"), (A, "北京。")],
    "reasoning": [(U, "What is 2+2?"), (A, "<think>\n2 plus 2 makes 4.\n</think>\n\n4"),
                  (U, "And 3+3?"), (A, "<think>\n3 plus 3 makes 6.\n</think>\n\n6")],
    "single_turn": [(U, "Why does ice float?"), (A, "Ice is less dense than water.")],
}


# What a thinking template's generation prompt writes after the assistant's turn header and its rendered turns do
# not have (the opening of the reasoning), by hand from each template: a call or answer is trained from before it.
THINK_HEADER = {"qwq": "<think>\n", "nemotron-nano-v2": "<think>\n\n", "minimax-m2": "<think>\n",
                "gemma4": "<|channel>thought\n<channel|>", "apriel-1.6": "Here are my reasoning steps:\n",
                "glm-4.7-flash": "<think>"}


def conversation(case):
    return [{"role": r, "content": c} for r, c in CASES[case]]


def with_template(base, spec):
    """`base` (a tokenizer) carrying the template and its real special tokens."""
    import copy

    tok = copy.deepcopy(base)
    tok.add_tokens(list(spec["special_tokens"]) + [t for t in (spec["bos_token"], spec["eos_token"]) if t],
                   special_tokens=True)
    if spec["added_tokens"]:
        tok.add_tokens(spec["added_tokens"])
    tok.bos_token = spec["bos_token"]
    tok.eos_token = spec["eos_token"]
    tok.chat_template = spec["chat_template"]
    return tok


@pytest.fixture(scope="module")
def tiny_base(session_outputs):
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


# ----------------------------------------------------------------------------- the oracle


class Unplaceable(Exception):
    pass


def render(tok, msgs, gen=False):
    # one reasoning block, opened once: not the empty one Kimi-K2-Thinking writes before an answer's own, nor
    # the answer's opener after the one Nemotron-Nano-v2's last turn (and its generation prompt) writes
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return text.replace("<think></think><think>", "<think>").replace("<think>\n\n<think>\n", "<think>\n\n")


def _norm(s):
    return re.sub(r"\s+", "", s.replace("<think>", "").replace("</think>", ""))


def oracle_turn(tok, spec, msgs, i):
    """(text, start, end, has_stop) of assistant message i rendered as the last message."""
    full = render(tok, msgs[: i + 1])
    prompt = render(tok, msgs[:i], gen=True)
    content = msgs[i]["content"]
    mark = "\u2603"
    assert mark not in content
    other = render(tok, msgs[:i] + [dict(msgs[i], content=mark)])
    cs, ce = render_diff(full, other)
    if full[cs - 1:cs] == "<":  # the diff split a tag the two share a "<" of (GLM-4.7: `<think>` vs `</think>`)
        cs -= 1
    if _norm(full[cs:ce]) != _norm(content):
        raise Unplaceable("the template does not render the answer's text")
    prefix = full.startswith(prompt) and len(prompt) <= ce
    start = len(prompt) if prefix else cs
    header = THINK_HEADER.get(spec["name"])
    if not prefix and header and prompt.endswith(header) and full.startswith(prompt[: -len(header)]) \
            and len(prompt) - len(header) <= cs:  # GLM-4.7: `</think>` before the text, written as the model does
        start = len(prompt) - len(header)
    eot = spec["end_of_turn"]
    after = full[ce:]
    gap = len(after) - len(after.lstrip())
    if eot["after_final_answer"] and after[gap:].startswith(eot["after_final_answer"]):
        return full, start, ce + gap + len(eot["after_final_answer"]), True
    if eot["after_final_answer"] is None and eot["after_earlier_answers"] and not after.strip():
        return full[:ce] + eot["after_earlier_answers"], start, ce + len(eot["after_earlier_answers"]), True
    if spec.get("appended_stop") and not after:  # nothing follows the answer: the model stops on eos (its data file)
        return full[:ce] + spec["appended_stop"], start, ce + len(spec["appended_stop"]), True
    raise Unplaceable("the declared end-of-turn token is not where the oracle expects it")


def oracle(tok, spec, messages):
    """Expected sequences: [(text, [(start, end)], n_stop)]."""
    msgs = list(messages)
    try:
        render(tok, msgs)
    except Exception:
        if msgs[0]["role"] != S:
            raise Unplaceable("the template refuses the conversation") from None
        msgs = [dict(msgs[1], content=msgs[0]["content"] + FOLD + msgs[1]["content"])] + msgs[2:]
        try:
            render(tok, msgs)
        except Exception:
            raise Unplaceable("the template refuses the conversation") from None
    turns = {i: oracle_turn(tok, spec, msgs, i) for i, m in enumerate(msgs) if m["role"] == A}
    whole = render(tok, msgs)
    last = len(msgs) - 1
    if last in turns:
        whole = turns[last][0]
    if all(whole[:end] == text[:end] for text, _, end, _ in turns.values()):
        return [(whole, [(s, e) for _, s, e, _ in turns.values()], sum(h for *_, h in turns.values()))]
    return [(text, [(s, e)], int(h)) for text, s, e, h in turns.values()]


def expected_labels(tok, text, spans):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        hit = e > s and any(e > s0 and s < e0 for s0, e0 in spans)
        labels.append(tid if hit else IGNORE_INDEX)
    return enc["input_ids"], labels


# ----------------------------------------------------------------------------- the checks


def check(tok, spec, case):
    messages = conversation(case)
    try:
        expected = oracle(tok, spec, messages)
    except Unplaceable as why:
        expected = why
    try:
        parts = split_for_template(tok, {"messages": messages})
        got = [encode_example(tok, p) for p in parts]
    except TemplateError as e:
        assert "\n" not in str(e) and str(e), f"a refusal must be one line: {e!r}"
        assert isinstance(expected, Unplaceable), f"refused ({e}) although the oracle places every answer"
        return "refused"
    if spec.get("text_stop") and isinstance(expected, Unplaceable):  # RWKV World: a text stop, no token
        assert all(e["n_eot"] == 0 < e["n_answers"] for e in got), "a text stop is no stop token"
        return "no stop token (prepare refuses it)"
    assert not isinstance(expected, Unplaceable), f"encoded although the oracle says: {expected}"
    assert len(got) == len(expected), "split into a different number of sequences"
    for enc, (text, spans, n_stop) in zip(got, expected):
        ids, labels = expected_labels(tok, text, spans)
        assert enc["input_ids"] == ids, "the token ids differ from the oracle's rendering"
        wrong = [t for t, (a, b) in enumerate(zip(enc["labels"], labels)) if a != b]
        assert not wrong, f"labels differ at token positions {wrong[:10]}"
        assert enc["n_eot"] == n_stop == enc["n_answers"], "every answer must end with its trained stop token"
    return "exact"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(SPECS))
def test_real_template_labels_by_position(tiny_base, name, case):
    spec = SPECS[name]
    check(with_template(tiny_base, spec), spec, case)


def test_collection_covers_the_families():
    families = {s["family"] for s in SPECS.values()}
    assert len(families) >= 25, families
    for s in SPECS.values():
        assert s["source"] and s["chat_template"] and s["eos_token"]


@pytest.mark.parametrize("name", list(SPECS))
def test_stop_token_ids_hold_every_end_of_turn_token(tiny_base, name):
    spec = SPECS[name]
    tok = with_template(tiny_base, spec)
    ids = stop_token_ids(tok)
    for s in list(spec["end_of_turn"].values()) + [spec.get("appended_stop")]:
        if s:  # a stop of several tokens (Command A's <|END_RESPONSE|><|END_OF_TURN_TOKEN|>): generation ends on its last
            last = [t for t in spec["special_tokens"] + [spec["eos_token"]] if s.endswith(t)][0]
            assert tok.convert_tokens_to_ids(last) in ids, s


# ----------------------------------------------------------------------------- SmolLM2's real tokenizer


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_real_tokenizer_labels_by_position(smol_tokenizer, case):
    """The same oracle on SmolLM2's own tokenizer and template; its pad token is its eos (<|im_end|>),
    and that stop token must still be trained on every answer."""
    spec = SPECS["smollm2"]
    tok = smol_tokenizer
    assert tok.chat_template == spec["chat_template"] and tok.eos_token == "<|im_end|>"
    assert check(tok, spec, case) == "exact"
    enc = encode_example(tok, {"messages": conversation(case)})
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    trained_eots = sum(1 for t, lab in zip(enc["input_ids"], enc["labels"]) if t == eot and lab == eot)
    assert trained_eots == enc["n_answers"] == sum(m[0] == A for m in CASES[case])
    assert stop_token_ids(tok) == [eot]


@pytest.mark.parametrize("name", ["llama3.1", "gemma2", "gpt-oss", "qwen3", "deepseek-coder", "qwen1.5"])
def test_templates_on_smollm2_tokenizer(smol_tokenizer, name):
    """Real templates on a real (non-tiny) tokenizer with their special tokens added."""
    spec = SPECS[name]
    tok = with_template(smol_tokenizer, spec)
    for case in CASES:
        check(tok, spec, case)


# ----------------------------------------------------------------------------- what the checks must catch


def test_oracle_catches_a_label_one_turn_too_early(tiny_base):
    """The check is by position: the same decoded text one turn early is a failure."""
    spec = SPECS["vicuna"]
    tok = with_template(tiny_base, spec)
    msgs = conversation("answer_in_prompt")
    (text, spans, _), = oracle(tok, spec, msgs)
    ids, good = expected_labels(tok, text, spans)
    first = text.index("yes")  # inside the question: "Is the answer yes or no?"
    _, bad = expected_labels(tok, text, [(first, first + len("yes"))] + spans[1:])
    assert first < spans[0][0] and bad != good


def test_named_cases_outcomes(tiny_base):
    """Which template x case pairs split, fold or refuse (and why) is as the templates dictate."""
    outcomes = {}
    for name in ("gemma", "mistral-v0.2", "qwen3", "gpt-oss", "qwen1.5", "deepseek-r1", "llama2"):
        spec = SPECS[name]
        tok = with_template(tiny_base, spec)
        for case in ("system_message", "reasoning", "short_answers"):
            try:
                parts = split_for_template(tok, {"messages": conversation(case)})
                encs = [encode_example(tok, p) for p in parts]
                outcomes[name, case] = (len(parts), any(e["system_folded"] for e in encs),
                                        sum(e["n_stop_appended"] for e in encs))
            except TemplateError as e:
                outcomes[name, case] = str(e)
    assert outcomes["gemma", "system_message"] == (1, True, 0)  # "System role not supported": folded
    assert outcomes["mistral-v0.2", "system_message"] == (1, True, 0)
    assert outcomes["qwen3", "reasoning"] == (2, False, 0)  # history drops <think>: one example per turn
    assert outcomes["qwen3", "short_answers"][0] == 3  # even without reasoning, earlier turns lose <think></think>
    assert outcomes["gpt-oss", "short_answers"][0] == 3  # <|return|> on the final answer, <|end|> in history
    assert outcomes["qwen1.5", "short_answers"] == (1, False, 1)  # <|im_end|> appended to the final answer
    assert "<think>" in outcomes["deepseek-r1", "reasoning"]  # the template drops reasoning: refused
    assert outcomes["llama2", "short_answers"] == (1, False, 0)
