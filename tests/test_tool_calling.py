"""Tool calling and reasoning in a separate field, on real chat templates, checked by position.

The real templates of tests/templates/*.json (Qwen2.5, Qwen3, QwQ, Llama 3.1/3.2/3.3, gpt-oss,
Mistral-Nemo, Mistral-Small-3.2, Granite 3.0/3.3, DeepSeek-R1, DeepSeek-V3.1, SmolLM2, Hermes 3, Command R7B,
SmolLM3, Baichuan 2, ChatGLM2, RWKV World, Kimi-K2-Thinking, Nemotron-Nano-v2, MiniMax-M2, Gemma 4,
Apriel 1.6, GLM-4.6, GLM-4.7-Flash) render
conversations with tools, tool calls, tool results and reasoning. Each is put on the tiny tokenizer
(its special tokens added) and on SmolLM2's real one, and lib.data.tokenization's labels are compared
token by token with the oracle below, which uses none of the project's code: it finds a tool call
by rendering the conversation with a different call and diffing, a text answer by rendering it with
the answer replaced, takes the stop token from the template's data file (and, for a tool call,
from TOOL_STOP, written here by hand from each model's documentation), and maps characters to
tokens through the tokenizer's offsets. What the assistant produced (calls, reasoning, answers) is
trained once with its stop token; tool schemas, tool results and user turns never are. The
outcome of each template x case (exact, or which one-line refusal) is written out by hand in
OUTCOMES, and the trained text of a call is compared by value with the template's syntax in CALLS.

Data samples: GLAIVE is the first record of LLaMA-Factory's data/glaive_toolcall_en_demo.json
(github.com/hiyouga/LLaMA-Factory), shortened.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import render_diff

from lib.data.templates import TemplateError, stop_token_ids
from lib.data.tokenization import IGNORE_INDEX, encode_example, split_for_template
from lib.run.errors import SFTError
from tests.test_templates import SPECS, THINK_HEADER, with_template

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}},
         {"type": "function", "function": {
             "name": "get_time", "description": "The local time of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def call(name, args, cid):
    return {"type": "function", "id": cid, "function": {"name": name, "arguments": args}}


def U(c):
    return {"role": "user", "content": c}


def A(c, **kw):
    return {"role": "assistant", "content": c, **kw}


def T(c, cid, name):
    return {"role": "tool", "content": c, "tool_call_id": cid, "name": name}


# Tool-call ids are 9 letters or digits: Mistral's templates refuse any other.
CASES = {
    "single_call": ([U("What is the weather in Paris?"),
                     A("", tool_calls=[call("get_weather", {"city": "Paris"}, "call00001")]),
                     T('{"temperature": 21, "sky": "clear"}', "call00001", "get_weather"),
                     A("It is 21 degrees and clear in Paris.")], TOOLS),
    "parallel_calls": ([U("Weather and time in Oslo?"),
                        A("", tool_calls=[call("get_weather", {"city": "Oslo"}, "call00001"),
                                          call("get_time", {"city": "Oslo"}, "call00002")]),
                        T('{"temperature": -3}', "call00001", "get_weather"),
                        T('{"time": "14:05"}', "call00002", "get_time"),
                        A("It is -3 degrees and 14:05 in Oslo.")], TOOLS),
    "two_rounds": ([U("Weather in Rome?"),
                    A("", tool_calls=[call("get_weather", {"city": "Rome"}, "call00001")]),
                    T('{"temperature": 25}', "call00001", "get_weather"),
                    A("25 degrees in Rome."),
                    U("And the time there?"),
                    A("", tool_calls=[call("get_time", {"city": "Rome"}, "call00002")]),
                    T('{"time": "09:30"}', "call00002", "get_time"),
                    A("It is 09:30 in Rome.")], TOOLS),
    "call_is_last": ([U("Weather in Lima?"),
                      A("", tool_calls=[call("get_weather", {"city": "Lima"}, "call00001")])], TOOLS),
    "weight0_call": ([U("Weather in Kyiv?"),
                      A("", weight=0, tool_calls=[call("get_weather", {"city": "Kyiv"}, "call00001")]),
                      T('{"temperature": 8}', "call00001", "get_weather"),
                      A("8 degrees in Kyiv.")], TOOLS),
    "reasoning": ([U("What is 2+2?"), A("4", reasoning_content="Two plus two makes four."),
                   U("And 3+3?"), A("6", reasoning_content="Three plus three makes six.")], None),
    "text_and_call": ([U("Weather in Paris?"),
                       A("Let me check.", tool_calls=[call("get_weather", {"city": "Paris"}, "call00001")]),
                       T('{"temperature": 21}', "call00001", "get_weather"),
                       A("21 degrees in Paris.")], TOOLS),
    "reasoning_then_call": ([U("Is it warm in Cairo?"),
                             A("", reasoning_content="I should look up the weather in Cairo.",
                               tool_calls=[call("get_weather", {"city": "Cairo"}, "call00001")]),
                             T('{"temperature": 35}', "call00001", "get_weather"),
                             A("Yes, 35 degrees.", reasoning_content="35 degrees is warm.")], TOOLS),
}

# The special token that ends an assistant turn calling tools, from each model's documentation
# (Qwen <|im_end|>, Llama 3.x <|eot_id|>, gpt-oss <|call|>, Mistral </s>).
TOOL_STOP = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "qwq": "<|im_end|>", "llama3.1": "<|eot_id|>",
             "llama3.2": "<|eot_id|>", "llama3.3": "<|eot_id|>", "gpt-oss": "<|call|>", "mistral-nemo": "</s>", "nemotron-nano-v2": "<SPECIAL_12>", "kimi-k2-thinking": "<|im_end|>", "minimax-m2": "[e~[",
             "gemma4": "<turn|>", "apriel-1.6": "</s>", "glm-4.6": "<|endoftext|>", "glm-4.7-flash": "<|endoftext|>", "mistral-small-3.2": "</s>", "hermes3": "<|im_end|>", "command-r7b": "<|END_OF_TURN_TOKEN|>"}

# The trained text of the call in single_call, as each template writes it (by hand, from the model cards).
CALLS = {
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "qwen3": '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call><|im_end|>',
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "llama3.2": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "gpt-oss": ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
    "mistral-nemo": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
    "mistral-small-3.2": '[TOOL_CALLS]get_weather[CALL_ID]call00001[ARGS]{"city": "Paris"}</s>',
    "hermes3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><turn|>',
    "glm-4.6": '\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
               '</tool_call><|endoftext|>',
    "glm-4.7-flash": '</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>'
                     '<|endoftext|>',
    "apriel-1.6": '\n<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls></s>',
    "command-r7b": '<|START_THINKING|><|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": '
                   '"get_weather", "parameters": {"city": "Paris"}}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>',
}

NO_TOOLS = "does not render tools (it has no tools handling)"
NO_CALLS = "does not render tool calls (it has no tool-call handling)"
NO_REASONING = "has no place for reasoning given in a separate field"

SINGLE_CALL = "This model only supports single tool-calls at once!"
DROPS_THINK = "it drops its <think> block"
DROPS_TEXT = "drops the text beside its tool call"
EOS_BEFORE_CALL = "before its tool call (it renders the text beside the call as a turn of its own)"
TOOL_CASES = [c for c in CASES if c != "reasoning"]
# template -> {case: "exact" | a piece of the one-line refusal}; cases not named are "exact".
OUTCOMES = {
    "qwen2.5": {"reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "qwen3": {},
    # QwQ's generation prompt opens <think>, its rendered calls have none: labelled from where they part;
    # its tokenizer has <think>: reasoning inlined
    "qwq": {},
    # Nemotron-Nano-v2: the same opener in its prompt; a last turn's text is rendered as a turn of its own that
    # ends (<SPECIAL_12>) before the call: refused; reasoning inlined after the prompt's own <think>
    "nemotron-nano-v2": {"text_and_call": EOS_BEFORE_CALL, "reasoning_then_call": EOS_BEFORE_CALL},
    # Kimi-K2-Thinking renders a call's id, not its function's name (its ids are "functions.NAME:N"); reasoning
    # inlined into the empty <think></think> it writes for earlier answers
    "kimi-k2-thinking": {c: NO_CALLS for c in TOOL_CASES},
    # MiniMax-M2: its prompt opens <think>, a rendered call follows `]~b]ai\n` directly: labelled from there
    "minimax-m2": {},
    # Gemma 4: its prompt writes an empty thought channel, rendered calls and answers follow `<|turn>model\n`:
    # labelled from there; it renders no reasoning field and has no <think> tokens
    "gemma4": {"reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    # Apriel 1.6: its prompt ends with the text header "Here are my reasoning steps:\n", rendered turns follow
    # `<|begin_assistant|>\n`: labelled from there; nothing closes a last turn, so eos (</s>) is appended
    "apriel-1.6": {},
    # GLM-4.6: no end-of-turn token (the next role token opens the next turn), so eos (<|endoftext|>, one of its
    # generation stops) is appended after each answer and call; reasoning rendered within the last user's answers
    "glm-4.6": {},
    # GLM-4.7-Flash: the same, but its prompt opens the reasoning (`<|assistant|><think>`) and a rendered turn
    # without reasoning writes `</think>` alone: labelled from `<|assistant|>`, where they part
    "glm-4.7-flash": {},
    "llama3.1": {"text_and_call": DROPS_TEXT, "parallel_calls": SINGLE_CALL, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "llama3.2": {"text_and_call": DROPS_TEXT, "parallel_calls": SINGLE_CALL, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "llama3.3": {"text_and_call": DROPS_TEXT, "parallel_calls": SINGLE_CALL, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    # gpt-oss renders only a message's first call; and it keeps an earlier call's analysis in the prompt
    # but drops it once a final answer follows, so the final answer's reasoning cannot be placed after it
    "gpt-oss": {"parallel_calls": "does not render its call of get_time whole",
                "reasoning_then_call": "does not render its reasoning within the answer"},
    "mistral-nemo": {"text_and_call": DROPS_TEXT, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "mistral-small-3.2": {"text_and_call": DROPS_TEXT, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "granite3.0": {**{c: NO_CALLS for c in TOOL_CASES}, "reasoning": NO_REASONING,
                   "reasoning_then_call": NO_REASONING},
    "granite3.3": {**{c: NO_CALLS for c in TOOL_CASES}, "reasoning": NO_REASONING,
                   "reasoning_then_call": NO_REASONING},
    "deepseek-v3.1": {**{c: NO_TOOLS for c in TOOL_CASES}, "reasoning": DROPS_THINK},
    "smollm2": {**{c: NO_TOOLS for c in TOOL_CASES}, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "hermes3": {"text_and_call": DROPS_TEXT, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    # Command R7B / A: calls in <|START_ACTION|>, answers end <|END_RESPONSE|><|END_OF_TURN_TOKEN|> (trained whole);
    # it renders reasoning only beside a call, so a final answer's has no place
    "command-r7b": {"text_and_call": DROPS_TEXT, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    # SmolLM3 reads xml_tools, not tools; its <think> tokens take reasoning inline
    "smollm3": {c: NO_TOOLS for c in TOOL_CASES},
    "baichuan2": {**{c: NO_TOOLS for c in TOOL_CASES}, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "chatglm2": {**{c: NO_TOOLS for c in TOOL_CASES}, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
    "rwkv-world": {**{c: NO_TOOLS for c in TOOL_CASES}, "reasoning": NO_REASONING, "reasoning_then_call": NO_REASONING},
}


@pytest.fixture(scope="module")
def tiny_base(session_outputs):
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


# ----------------------------------------------------------------------------- the oracle


class Unplaceable(Exception):
    pass


def render(tok, msgs, tools, gen=False):
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    try:
        text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
        # one reasoning block, opened once: not the empty one Kimi-K2-Thinking writes before an inline one,
        # nor an inline opener after the one Nemotron-Nano-v2's prompt writes
        return text.replace("<think></think><think>", "<think>").replace("<think>\n\n<think>\n", "<think>\n\n")
    except Exception as e:  # the template's raise_exception
        raise Unplaceable(f"the template refuses the conversation: {e}") from None


def _norm(s):
    return re.sub(r"\s+", "", s)


def oracle_turn(tok, spec, name, msgs, i, tools):
    """(text, start, end) of assistant message i rendered as the last message."""
    m = msgs[i]
    full = render(tok, msgs[: i + 1], tools)
    prompt = render(tok, msgs[:i], tools, gen=True)
    prefix = full.startswith(prompt)
    start = len(prompt)
    if m.get("tool_calls"):
        if not prefix:  # a thinking prompt opens its reasoning (THINK_HEADER), the rendered call has none:
            header = THINK_HEADER.get(name)  # labelled from where they part, if that is all
            bare = prompt[: -len(header)] if header and prompt.endswith(header) else None
            if bare is None or not full.startswith(bare):
                raise Unplaceable("the generation prompt is not a prefix of the rendered call")
            start = len(bare)
        other = [dict(c, function={"name": "zzOtherFn", "arguments": {"zzKey": "zzValue"}}) for c in m["tool_calls"]]
        cs, ce = render_diff(full, render(tok, msgs[:i] + [dict(m, tool_calls=other)], tools))
        for c in m["tool_calls"]:
            if c["function"]["name"] not in full[cs:ce]:
                raise Unplaceable("the template does not render the tool call")
        stop = TOOL_STOP.get(name)
        if stop and stop == spec.get("appended_stop") and stop not in full[ce:]:  # Apriel: nothing ends a last turn
            full = full + stop
        if stop is None or stop not in full[ce:]:
            raise Unplaceable("no declared stop token after the call")
        end = full.index(stop, ce) + len(stop)
        if spec["eos_token"] in full[start:cs]:  # Nemotron-Nano-v2 renders a last turn's text as a turn of its own
            raise Unplaceable("the turn ends (eos) before its call")
        bare = lambda x: re.sub(r"</?think>", "", _norm(x))  # noqa: E731  (QwQ: its prompt opens the <think>)
        if m["content"] and bare(m["content"]) not in bare(full[start:end]):
            raise Unplaceable("the template drops the text beside the call")
        return full, start, end
    mark = "\u2603"
    cs, ce = render_diff(full, render(tok, msgs[:i] + [dict(m, content=mark)], tools))
    if re.sub("</?think>", "", _norm(full[cs:ce])) != re.sub("</?think>", "", _norm(m["content"])):  # Kimi: <think> shared
        raise Unplaceable("the template does not render the answer's text (or drops its <think> block)")
    header = THINK_HEADER.get(name)
    if not prefix and header and prompt.endswith(header) and full.startswith(prompt[: -len(header)]) \
            and len(prompt) - len(header) <= cs:  # Apriel 1.6: its reasoning follows the turn's header
        prefix, start = True, len(prompt) - len(header)
    if not (prefix and start <= ce):  # the history was rewritten (gpt-oss drops a call's text once an answer follows)
        # the model writes what follows the generation prompt's own header (gpt-oss: <|start|>assistant, then
        # <|channel|>final<|message|>); DeepSeek-R1 / QwQ: the header's <think> is not in the history, so from the text
        bare, gen = render(tok, msgs[:i], tools), render(tok, msgs[:i], tools, gen=True)
        header = gen[len(bare):] if gen.startswith(bare) else ""
        h = full.rfind(header, 0, cs) if header.strip() else -1
        start = h + len(header) if h >= 0 and not any(
            x["content"] and x["content"] in full[h + len(header):cs] for x in msgs) else cs
    eot = spec["end_of_turn"]["after_final_answer"]
    if eot is None and spec.get("appended_stop") and not full[ce:]:  # Baichuan 2, Apriel 1.6: the model stops on eos
        eot, full = spec["appended_stop"], full + spec["appended_stop"]
    if eot is None:
        raise Unplaceable("no end-of-turn token after the answer")
    after = full[ce:]
    if not after.lstrip().startswith(eot):
        raise Unplaceable("the declared end-of-turn token is not after the answer")
    return full, start, ce + (len(after) - len(after.lstrip())) + len(eot)


def oracle(tok, spec, name, msgs, tools):
    """Expected sequences [(text, [(start, end)])] or Unplaceable."""
    if tools and not all(t["function"]["description"] in render(tok, msgs[:1], tools) for t in tools):
        raise Unplaceable("the template does not render the tool schemas")
    given = msgs
    if any(m.get("reasoning_content") for m in msgs):
        probe = [U("q"), A("a", reasoning_content="zzThought")]
        renders = [k for k in ("reasoning_content", "thinking")
                   if "zzThought" in render(tok, [probe[0], {**probe[1], k: "zzThought"}], None)]
        if renders and renders[0] != "reasoning_content":  # gpt-oss reads `thinking` (transformers 5.0 maps no key)
            msgs = [{(renders[0] if k == "reasoning_content" else k): v for k, v in m.items()} for m in msgs]
        if not renders:
            vocab = tok.get_vocab()
            if "<think>" not in vocab or "</think>" not in vocab:
                raise Unplaceable("no place for reasoning and no <think> tokens")
            msgs = [{k: v for k, v in m.items() if k != "reasoning_content"}  # the documented inline form
                    | ({"content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
                       if m.get("reasoning_content") else {}) for m in msgs]
    for i, m in enumerate(msgs):
        if m.get("tool_calls"):
            other = [dict(c, function={"name": "zzOtherFn", "arguments": {}}) for c in m["tool_calls"]]
            mine, theirs = render(tok, msgs[: i + 1], tools), render(tok, msgs[:i] + [dict(m, tool_calls=other)], tools)
            if mine == theirs:
                raise Unplaceable("the template ignores tool calls")
            cs, ce = render_diff(mine, theirs)
            if not all(c["function"]["name"] in mine[cs:ce] for c in m["tool_calls"]):
                raise Unplaceable("the template does not render the called function's name")  # Kimi: in the id
    trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    turns = {i: oracle_turn(tok, spec, name, msgs, i, tools) for i in trained}
    if any(m.get("reasoning_content") for m in given) and not all(
            _norm(m["reasoning_content"]) in _norm(t[0][t[1]:t[2]]) for i, t in turns.items()
            for m in [given[i]] if m.get("reasoning_content")):
        raise Unplaceable("a reasoning is not rendered within its answer")
    whole = render(tok, msgs, tools)
    if all(whole[:end] == text[:end] for text, _, end in turns.values()):
        return [(whole, [(s, e) for _, s, e in turns.values()])]
    return [(text, [(s, e)]) for text, s, e in turns.values()]


def expected_labels(tok, text, spans):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if e > s and any(e > s0 and s < e0 for s0, e0 in spans) else IGNORE_INDEX
              for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def trained_texts(tok, text, labels):
    """The text of each run of trained tokens, through the offsets."""
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    runs, cur = [], None
    for (s, e), lab in zip(offs, labels + [IGNORE_INDEX] * (len(offs) - len(labels))):
        if lab != IGNORE_INDEX:
            cur = [s, e] if cur is None else [cur[0], e]
        elif cur is not None:
            runs.append(text[cur[0]:cur[1]])
            cur = None
    return runs + ([text[cur[0]:cur[1]]] if cur else [])


def check(tok, spec, name, case):
    msgs, tools = CASES[case]
    example = {"messages": msgs, **({"tools": tools} if tools else {})}
    try:
        expected = oracle(tok, spec, name, msgs, tools)
    except Unplaceable as why:
        expected = why
    try:
        parts = split_for_template(tok, example)
        got = [encode_example(tok, p) for p in parts]
    except TemplateError as e:
        assert "\n" not in str(e) and str(e), f"a refusal must be one line: {e!r}"
        assert isinstance(expected, Unplaceable), f"refused ({e}) although the oracle places every answer"
        return str(e)
    assert not isinstance(expected, Unplaceable), f"encoded although the oracle says: {expected}"
    assert len(got) == len(expected), "split into a different number of sequences"
    for enc, (text, spans) in zip(got, expected):
        ids, labels = expected_labels(tok, text, spans)
        assert enc["input_ids"] == ids, "the token ids differ from the oracle's rendering"
        wrong = [t for t, (a, b) in enumerate(zip(enc["labels"], labels)) if a != b]
        assert not wrong, f"labels differ at token positions {wrong[:10]}"
        assert enc["n_eot"] == enc["n_answers"] == len(spans), "every answer and call must end with its stop token"
        runs = trained_texts(tok, text, enc["labels"])
        for m in msgs:  # tool results, schemas and user turns are never trained
            if m["role"] in ("tool", "user"):
                assert not any(m["content"] in r for r in runs), m["content"]
        if tools:
            assert not any(tools[0]["function"]["description"] in r for r in runs)
    return "exact", got, expected


# ----------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(OUTCOMES))
def test_tool_calls_and_reasoning_by_position(tiny_base, name, case):
    spec = SPECS[name]
    out = check(with_template(tiny_base, spec), spec, name, case)
    want = OUTCOMES[name].get(case, "exact")
    if want == "exact":
        assert out[0] == "exact", out
    else:
        assert isinstance(out, str) and want in out, out


@pytest.mark.parametrize("name", list(CALLS))
def test_the_trained_call_is_the_templates_syntax(tiny_base, name):
    """By value: the first trained run of single_call is the call exactly as the model writes it."""
    spec = SPECS[name]
    tok = with_template(tiny_base, spec)
    _, got, expected = check(tok, spec, name, "single_call")
    text = expected[0][0]
    runs = trained_texts(tok, text, got[0]["labels"])
    assert runs[0] == CALLS[name]
    assert TOOL_STOP[name] and tok.convert_tokens_to_ids(TOOL_STOP[name]) in stop_token_ids(tok)


def test_gpt_oss_trains_the_final_header_after_a_text_plus_call_turn(tiny_base):
    """By value: gpt-oss drops a call's text from the history once an answer follows, so the answer's
    generation prompt is no prefix of the conversation; the answer is still trained from its
    <|channel|>final<|message|> header (what the model writes after <|start|>assistant), as the other
    gpt-oss turns are, and the call turn with its text (the analysis channel) and its call."""
    spec = SPECS["gpt-oss"]
    tok = with_template(tiny_base, spec)
    _, got, expected = check(tok, spec, "gpt-oss", "text_and_call")
    runs = [trained_texts(tok, text, enc["labels"]) for enc, (text, _) in zip(got, expected)]
    assert runs == [['<|channel|>analysis<|message|>Let me check.<|end|><|start|>assistant to=functions.get_weather'
                     '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'],
                    ["<|channel|>final<|message|>21 degrees in Paris.<|return|>"]]


def test_text_that_begins_like_the_thinking_header_is_trained_whole(tiny_base):
    """By value: Apriel 1.6's prompt ends with the text "Here are my reasoning steps:\n" that rendered turns do not
    have; a turn is labelled from where prompt and rendering part, but never after where the turn's own text
    begins, so an answer (or a call's text) that opens with the same words is trained whole, with its eos."""
    spec = SPECS["apriel-1.6"]
    tok = with_template(tiny_base, spec)
    head = "Here are my reasoning steps: none needed."
    msgs = [U("Weather in Paris?"), A(head, tool_calls=[call("get_weather", {"city": "Paris"}, "call00001")]),
            T('{"temperature": 21}', "call00001", "get_weather"), A(head + " 21 degrees.")]
    runs = []
    for part in split_for_template(tok, {"messages": msgs, "tools": TOOLS}):
        enc = encode_example(tok, part)
        runs += trained_texts(tok, tok.decode(enc["input_ids"]), enc["labels"])
    assert runs == [head + '\n<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls></s>',
                    head + " 21 degrees.</s>"]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3.1", "gpt-oss", "mistral-nemo", "granite3.3", "hermes3",
                                  "command-r7b", "qwq", "nemotron-nano-v2", "kimi-k2-thinking", "minimax-m2",
                                  "gemma4", "apriel-1.6", "glm-4.6", "glm-4.7-flash"])
def test_on_smollm2_real_tokenizer(smol_tokenizer, name):
    spec = SPECS[name]
    tok = with_template(smol_tokenizer, spec)
    for case in CASES:
        out = check(tok, spec, name, case)
        want = OUTCOMES[name].get(case, "exact")
        assert (out[0] == "exact") if want == "exact" else (want in out), (case, out)


def test_multi_token_stops_and_appended_eos_by_value(tiny_base):
    """Command A's two-token stop is trained whole; Baichuan 2 trains eos (its generation stop), never the
    user-turn opener <reserved_106> that follows an answer; RWKV World's text stop leaves no stop token."""
    msgs = [U("Hi?"), A("Hello."), U("Bye?"), A("Bye.")]
    spec = SPECS["command-r7b"]
    tok = with_template(tiny_base, spec)
    enc = encode_example(tok, {"messages": msgs})
    text = render(tok, msgs, None)
    assert trained_texts(tok, text, enc["labels"]) == ["<|START_RESPONSE|>Hello.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
                                                        "<|START_RESPONSE|>Bye.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]
    assert tok.convert_tokens_to_ids("<|END_OF_TURN_TOKEN|>") in stop_token_ids(tok)
    spec = SPECS["baichuan2"]
    tok = with_template(tiny_base, spec)
    parts = split_for_template(tok, {"messages": msgs})
    assert len(parts) == 2 and parts[0]["messages"][-1] == A("Hello.")
    runs = [r for p in parts for enc in [encode_example(tok, p)]
            for r in trained_texts(tok, render(tok, p["messages"], None) + "</s>", enc["labels"])]
    assert runs == ["Hello.</s>", "Bye.</s>"]
    assert tok.convert_tokens_to_ids("<reserved_106>") not in stop_token_ids(tok)
    tok = with_template(tiny_base, SPECS["rwkv-world"])
    enc = encode_example(tok, {"messages": msgs})
    assert enc["n_eot"] == 0 < enc["n_answers"]


def test_smollm2_own_template_refuses_tools_in_one_line(smol_tokenizer):
    msgs, tools = CASES["single_call"]
    with pytest.raises(TemplateError, match=re.escape(NO_TOOLS)) as e:
        split_for_template(smol_tokenizer, {"messages": msgs, "tools": tools})
    assert smol_tokenizer.name_or_path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TemplateError, match=re.escape(NO_CALLS)):  # no schemas given: the calls themselves are refused
        encode_example(smol_tokenizer, {"messages": msgs})


def test_gpt_oss_reasoning_is_the_analysis_channel(tiny_base):
    """gpt-oss renders `thinking` (given as reasoning_content) in its analysis channel: trained with the answer."""
    spec = SPECS["gpt-oss"]
    tok = with_template(tiny_base, spec)
    _, got, expected = check(tok, spec, "gpt-oss", "reasoning")
    runs = [r for enc, (text, _) in zip(got, expected) for r in trained_texts(tok, text, enc["labels"])]
    assert runs == ["<|channel|>analysis<|message|>Two plus two makes four.<|end|><|start|>assistant"
                    "<|channel|>final<|message|>4<|return|>",
                    "<|channel|>analysis<|message|>Three plus three makes six.<|end|><|start|>assistant"
                    "<|channel|>final<|message|>6<|return|>"]


def test_inline_reasoning_option_and_think_tokens(tiny_base):
    """No place for reasoning: refused, inlined with data.inline_reasoning, or inlined when the tokenizer has <think>."""
    spec = SPECS["llama3.1"]
    tok = with_template(tiny_base, spec)
    example = {"messages": [U("What is 2+2?"), A("4", reasoning_content="Two plus two.")]}
    with pytest.raises(TemplateError, match="data.inline_reasoning=true"):
        split_for_template(tok, example)
    (part,) = split_for_template(tok, example, inline_reasoning=True)
    assert part["messages"][1] == A("<think>\nTwo plus two.\n</think>\n\n4")
    enc = encode_example(tok, part)
    text = render(tok, part["messages"], None)
    assert trained_texts(tok, text, enc["labels"]) == ["<think>\nTwo plus two.\n</think>\n\n4<|eot_id|>"]
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    assert split_for_template(tok, example)[0]["messages"][1]["content"].startswith("<think>\nTwo plus two.")


# ----------------------------------------------------------------------------- the data shapes

GLAIVE = {"conversations": [
    {"from": "human", "value": "I have chicken, bell peppers, and rice."},
    {"from": "function_call",
     "value": "{\"name\": \"search_recipes\", \"arguments\": {\"ingredients\": [\"chicken\", \"bell peppers\", \"rice\"]}}"},
    {"from": "observation", "value": "{\"recipes\": [{\"name\": \"Chicken and Bell Pepper Stir Fry\"}]}"},
    {"from": "gpt", "value": "I found a recipe for you: Chicken and Bell Pepper Stir Fry."}],
    "tools": "[{\"name\": \"search_recipes\", \"description\": \"Search for recipes based on ingredients\", "
             "\"parameters\": {\"type\": \"object\", \"properties\": {\"ingredients\": {\"type\": \"array\", "
             "\"items\": {\"type\": \"string\"}, \"description\": \"The ingredients to search for\"}}, "
             "\"required\": [\"ingredients\"]}}]"}
RECIPES = {"name": "search_recipes", "description": "Search for recipes based on ingredients",
           "parameters": {"type": "object", "properties": {"ingredients": {
               "type": "array", "items": {"type": "string"}, "description": "The ingredients to search for"}},
               "required": ["ingredients"]}}
GLAIVE_MESSAGES = [U("I have chicken, bell peppers, and rice."),
                   A("", tool_calls=[{"type": "function", "function": {
                       "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]),
                   {"role": "tool", "content": "{\"recipes\": [{\"name\": \"Chicken and Bell Pepper Stir Fry\"}]}"},
                   A("I found a recipe for you: Chicken and Bell Pepper Stir Fry.")]
OPENAI = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "Look it up.", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "21"},
    {"role": "assistant", "content": "21 degrees.", "thinking": "The tool says 21."}], "tools": TOOLS[:1]}


def _write(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_glaive_sharegpt_becomes_openai_messages(tmp_path):
    from lib.data.examples import prepare_examples

    p = prepare_examples(str(_write(tmp_path, [GLAIVE])), eval_fraction=0.0)
    assert p.format == "sharegpt"
    assert p.train[0]["messages"] == GLAIVE_MESSAGES
    assert p.train[0]["tools"] == [{"type": "function", "function": RECIPES}]
    uses = {r["field"]: r["use"] for r in p.fields}
    assert uses["tools"].startswith("the tool schemas") and not any(r["unused_text_records"] for r in p.fields)


def test_openai_tool_record_is_kept_whole(tmp_path):
    from lib.data.examples import prepare_examples

    p = prepare_examples(str(_write(tmp_path, [OPENAI])), eval_fraction=0.0)
    m = p.train[0]["messages"]
    assert m[1] == A("", reasoning_content="Look it up.",
                     tool_calls=[call("get_weather", {"city": "Paris"}, "call00001")])
    assert m[2] == {"role": "tool", "content": "21", "tool_call_id": "call00001"}
    assert m[3] == A("21 degrees.", reasoning_content="The tool says 21.")
    assert p.train[0]["tools"] == TOOLS[:1]


def test_prepare_refuses_tools_on_a_template_without_them_and_writes_nothing(tmp_path, outputs):
    from lib.data.prepare import run_prepare
    from lib.run.paths import run_paths

    with pytest.raises(SFTError) as e:
        run_prepare("tools", str(_write(tmp_path, [GLAIVE, GLAIVE])), overrides=["data.eval_fraction=0"])
    msg = str(e.value)
    assert "line 1" in msg and NO_TOOLS in msg and "\n" not in msg, msg
    assert not run_paths("tools").root.exists()


def test_prepare_trains_a_tool_set_through_a_tool_template(tmp_path, outputs):
    """The whole stage on SmolLM2 with data.prompt_format set to Qwen2.5's template (which renders tools)."""
    from lib.data.prepare import run_prepare
    from lib.data.readers import read_examples
    from lib.run.paths import run_paths

    template = SPECS["qwen2.5"]["chat_template"]
    opts = ["data.eval_fraction=0", "model.name_or_path=smol", f"data.prompt_format={template}"]
    report = run_prepare("glaive", str(_write(tmp_path, [GLAIVE, GLAIVE])), overrides=opts)
    assert report["counts"]["train"] == 2
    assert read_examples(run_paths("glaive").train_data)[0]["messages"] == GLAIVE_MESSAGES
    from lib.data.prepare import preview

    shown = preview("glaive")  # the tool-calling example, its call and answer marked, the tool result not
    assert '«<tool_call>\n{"name": "search_recipes"' in shown and "«{\"recipes\"" not in shown, shown
    assert report["tools_and_reasoning"]["tool_calls"] == 2 and report["tools_and_reasoning"]["tool_results"] == 2
    with pytest.raises(SFTError, match=r"line 1: .*data\.inline_reasoning=true"):
        run_prepare("openai", str(_write(tmp_path, [OPENAI, OPENAI])), overrides=opts)
    run_prepare("openai", str(_write(tmp_path, [OPENAI, OPENAI])), overrides=opts + ["data.inline_reasoning=true"])
    ex = read_examples(run_paths("openai").train_data)[0]
    assert ex["messages"][1]["content"] == "<think>\nLook it up.\n</think>\n\n"
    assert ex["messages"][3]["content"] == "<think>\nThe tool says 21.\n</think>\n\n21 degrees."


def test_the_tool_probe_gives_its_parameter_a_description(tiny_base):
    """A template that writes each parameter as `name (type): description` by string concatenation (as Command R+'s
    tool template does) fails on a schema without descriptions: the probe gives one, so such a template is
    found to render tools instead of being refused as having no tools handling."""
    import copy

    from lib.data.templates import template_info

    tok = copy.deepcopy(tiny_base)
    tok.chat_template = (
        "{%- if tools %}{{- 'Tools:' }}{%- for t in tools %}{%- set f = t.function %}{{- '\\n' + f.name + ':' }}"
        "{%- for name, p in f.parameters.properties|items %}{{- ' ' + name + ' (' + p.type + '): ' + p.description }}"
        "{%- endfor %}{%- endfor %}{{- '\\n' }}{%- endif %}"
        "{%- for m in messages %}{{- '<|' + m.role + '|>' + (m.content or '') + eos_token }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}")
    assert template_info(tok).renders_tools
