"""Tool-calling and reasoning sets in their own layouts, and the refusals of layouts no shape reads.

Each record is written here in the layout of the public set it names: glaiveai/glaive-function-calling-v2
(`system` with the function schemas, one `chat` string with USER: / ASSISTANT: / <functioncall> /
FUNCTION RESPONSE:, the call's arguments a JSON string in single quotes), Salesforce/xlam-function-calling-60k
(`query`, and `tools` / `answers` as JSON strings; parallel calls) and simplescaling/s1K (question,
thinking_trajectories, attempt, solution, cot_type, source_type, metadata). The conversation each must become
is written out by hand; the labels are then checked by position: tool sets on Qwen2.5's real template (a
template that renders tools) put on the tiny tokenizer and on SmolLM2's real one, against the oracle of
tests/test_tool_calling.py; s1K's reasoning inlined as <think>...</think> (data.inline_reasoning, since
neither template has a place for it) against the oracle of tests/test_shapes.py.
"""

from __future__ import annotations

import json

import pytest

from lib.data.examples import prepare_examples
from lib.data.tokenization import encode_example, split_for_template
from lib.run.errors import DataError
from tests.test_shapes import check_labels
from tests.test_templates import SPECS, with_template
from tests.test_tool_calling import expected_labels, oracle, tiny_base  # noqa: F401 (a fixture)

GLAIVE_SYSTEM = (
    "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
    "{\n    \"name\": \"get_stock_price\",\n    \"description\": \"Get the current stock price of a company\",\n"
    "    \"parameters\": {\n        \"type\": \"object\",\n        \"properties\": {\n            \"symbol\": {\n"
    "                \"type\": \"string\",\n                \"description\": \"The stock symbol\"\n            }\n"
    "        },\n        \"required\": [\n            \"symbol\"\n        ]\n    }\n}\n\n"
    "{\n    \"name\": \"convert_currency\",\n    \"description\": \"Convert an amount from one currency to another\",\n"
    "    \"parameters\": {\"type\": \"object\", \"properties\": {\"amount\": {\"type\": \"number\"}}}\n}\n")
GLAIVE = {
    "system": GLAIVE_SYSTEM,
    "chat": "USER: Hi, what's the current price of Apple's stock?\n\n\n"
            "ASSISTANT: <functioncall> {\"name\": \"get_stock_price\", \"arguments\": '{\"symbol\": \"AAPL\"}'} "
            "<|endoftext|>\n\n\n"
            "FUNCTION RESPONSE: {\"stock_price\": 150.75}\n\n\n"
            "ASSISTANT: The current price of Apple's stock is $150.75. <|endoftext|>\n\n\n"
            "USER: Thank you!\n\n\n"
            "ASSISTANT: You're welcome! If you have any other questions, feel free to ask. <|endoftext|>\n",
}
GLAIVE_NO_TOOLS = {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n",
                   "chat": "USER: Can you tell me a joke?\n\n\nASSISTANT: Why did the scarecrow win an award? "
                           "Because he was outstanding in his field. <|endoftext|>\n"}
STOCK = {"type": "function", "function": {
    "name": "get_stock_price", "description": "Get the current stock price of a company",
    "parameters": {"type": "object", "properties": {"symbol": {"type": "string", "description": "The stock symbol"}},
                   "required": ["symbol"]}}}
CURRENCY = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount from one currency to another",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}}

XLAM = {"id": 5, "query": "Where can I find live giveaways for beta access and games?",
        "answers": json.dumps([{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
                               {"name": "live_giveaways_by_type", "arguments": {"type": "game"}}]),
        "tools": json.dumps([{"name": "live_giveaways_by_type",
                              "description": "Retrieve live giveaways from the GamerPower API based on the type.",
                              "parameters": {"type": {"description": "The type of giveaways (game, loot, beta).",
                                                      "type": "str", "default": "game"},
                                             "platform": {"description": "The platform, e.g. pc.", "type": "str"}}}])}
XLAM_TOOL = {"type": "function", "function": {
    "name": "live_giveaways_by_type", "description": "Retrieve live giveaways from the GamerPower API based on the type.",
    "parameters": {"type": "object", "properties": {
        "type": {"description": "The type of giveaways (game, loot, beta).", "type": "str", "default": "game"},
        "platform": {"description": "The platform, e.g. pc.", "type": "str"}}, "required": ["platform"]}}}

S1K = {"solution": "1. Rewrite the function using trigonometric identities: ...", "question":
       "Let $a,b,A,B$ be given reals. Prove that if $f(x) \\geq 0$ for all real $x$ then $a^2 + b^2 \\leq 2$.",
       "cot_type": "math", "source_type": "AI-MO/NuminaMath-CoT/aops_forum", "metadata": "{'source': 'aops_forum'}",
       "cot": None, "thinking_trajectories": ["Let $f(x) = 1 - a \\cos x - b \\sin x$.\nConsider $f(x) + f(x + \\pi)$."],
       "attempt": "Taking $x$ and $x + \\pi$ gives $a^2 + b^2 \\leq 2$."}


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _prepared(tmp_path, records, name="data.jsonl", **opts):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return prepare_examples(str(path), eval_fraction=0.0, **opts)


def test_glaive_becomes_turns_calls_and_tools(tmp_path):
    p = _prepared(tmp_path, [GLAIVE, GLAIVE_NO_TOOLS])
    assert p.format == "glaive"
    assert p.train[0]["messages"] == [
        {"role": "user", "content": "Hi, what's the current price of Apple's stock?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_stock_price", {"symbol": "AAPL"})]},
        {"role": "tool", "content": "{\"stock_price\": 150.75}", "name": "get_stock_price"},
        {"role": "assistant", "content": "The current price of Apple's stock is $150.75."},
        {"role": "user", "content": "Thank you!"},
        {"role": "assistant", "content": "You're welcome! If you have any other questions, feel free to ask."}]
    assert p.train[0]["tools"] == [STOCK, CURRENCY]
    assert p.train[1]["messages"][0] == {"role": "system",
                                         "content": "You are a helpful assistant, with no access to external functions."}
    assert "tools" not in p.train[1]
    assert {r["field"]: r["unused_text_records"] for r in p.fields} == {"system": 0, "chat": 0}


def test_xlam_becomes_one_turn_of_parallel_calls(tmp_path):
    p = _prepared(tmp_path, [XLAM])
    assert p.format == "xlam"
    assert p.train[0]["messages"] == [
        {"role": "user", "content": XLAM["query"]},
        {"role": "assistant", "content": "", "tool_calls": [call("live_giveaways_by_type", {"type": "beta"}),
                                                            call("live_giveaways_by_type", {"type": "game"})]}]
    assert p.train[0]["tools"] == [XLAM_TOOL]
    assert p.train[0]["metadata"] == {"id": 5, "line": 1}


def test_s1k_reasoning_and_answer(tmp_path):
    p = _prepared(tmp_path, [S1K])
    assert p.format == "reasoning"
    assert p.train[0]["messages"] == [
        {"role": "user", "content": S1K["question"]},
        {"role": "assistant", "content": S1K["attempt"], "reasoning_content": S1K["thinking_trajectories"][0]}]
    uses = {r["field"]: r["use"] for r in p.fields}
    assert uses["solution"].startswith("metadata") and uses["thinking_trajectories"].startswith("the answer's reasoning")


@pytest.mark.parametrize("tokenizer", ["tiny_base", "smol_tokenizer"])
@pytest.mark.parametrize("record", ["glaive", "xlam"])
def test_tool_sets_by_position_on_a_tool_template(record, tokenizer, tmp_path, request):
    tok = with_template(request.getfixturevalue(tokenizer), SPECS["qwen2.5"])
    ex = _prepared(tmp_path, [GLAIVE if record == "glaive" else XLAM]).train[0]
    expected = oracle(tok, SPECS["qwen2.5"], "qwen2.5", ex["messages"], ex["tools"])
    parts = split_for_template(tok, ex)
    assert len(parts) == len(expected)
    for part, (text, spans) in zip(parts, expected):
        enc = encode_example(tok, part)
        ids, labels = expected_labels(tok, text, spans)
        assert enc["input_ids"] == ids and enc["labels"] == labels
        assert enc["n_answers"] == sum(m["role"] == "assistant" for m in ex["messages"]) == len(spans)


@pytest.mark.parametrize("tokenizer, eot", [("tiny_base", "</s>"), ("smol_tokenizer", "<|im_end|>")])
def test_s1k_by_position_with_its_reasoning_inline(tokenizer, eot, tmp_path, request):
    tok = request.getfixturevalue(tokenizer)
    ex = _prepared(tmp_path, [S1K]).train[0]
    (part,) = split_for_template(tok, ex, inline_reasoning=True)
    answer = part["messages"][-1]["content"]
    assert answer == f"<think>\n{S1K['thinking_trajectories'][0]}\n</think>\n\n{S1K['attempt']}"
    check_labels(tok, eot, part)


def test_the_opening_greeting_is_dropped_with_a_line_and_a_count(tmp_path):
    records = [{"conversations": [{"from": "gpt", "value": "Hi! How can I help?"}, {"from": "human", "value": "2+2?"},
                                  {"from": "gpt", "value": "4"}]},
               {"conversations": [{"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]},
               {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "Hello."},
                                  {"from": "gpt", "value": "Ask me."}, {"from": "human", "value": "1+1?"},
                                  {"from": "gpt", "value": "2"}]}]
    p = _prepared(tmp_path, records)
    assert [m["content"] for m in p.train[2]["messages"]] == ["Be brief.", "1+1?", "2"]
    (note,) = [n for n in p.notes if "opened with an assistant turn" in n]
    assert note.startswith("2 conversations") and "those 3 turns were dropped" in note and "line 1" in note


def test_llamafactory_v1_reasoning_and_tool_call_parts(tmp_path):
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "I should call the tool."},
                                          {"type": "tool_call", "value": json.dumps(
                                              {"name": "get_weather", "arguments": {"city": "Oslo"}})}],
         "loss_weight": 1.0}]}
    p = _prepared(tmp_path, [rec])
    assert p.train[0]["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                                         "tool_calls": [call("get_weather", {"city": "Oslo"})]}


REFUSALS = {
    # s1K without its reasoning field: 'question' is no longer taken for the Question/Answer format
    "question_without_answer": ({"question": "Q?", "solution": "S.", "attempt": "A."},
                                ["'answer' is missing", "data.columns={prompt: question", "--format",
                                 "data.ignore_fields"]),
    "prompt_without_completion": ({"prompt": "P?", "explanation": "E.", "output_text": "O."},
                                  ["'completion' is missing", "data.columns=", "--format", "data.ignore_fields"]),
    "v1_image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "x.png"}]},
                                    {"role": "assistant", "content": [{"type": "text", "value": "A cat."}]}]},
                      ["type 'image_url' is not supported", "messages[1].content[1]"]),
    # OpenR1-Math: every unused text field named at once, metadata (problem_type, uuid) not among them
    "openr1_unused": ({"problem": "What is 2+2?", "solution": "2+2=4", "answer": "4", "problem_type": "Algebra",
                       "uuid": "u1", "generations": ["<think>2+2</think> 4"],
                       "messages": [{"role": "user", "content": "What is 2+2?"},
                                    {"role": "assistant", "content": "<think>2+2</think> 4"}]},
                      ["data.ignore_fields=[solution, answer, generations]", "--format"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_real_cause_and_the_ways_on(case, tmp_path):
    record, wanted = REFUSALS[case]
    with pytest.raises(DataError) as e:
        _prepared(tmp_path, [record])
    message = str(e.value)
    assert "\n" not in message and "line 1" in message
    for w in wanted:
        assert w in message, (w, message)


def test_a_lone_field_still_names_its_missing_partner(tmp_path):
    with pytest.raises(DataError, match="field 'output': missing answer"):
        _prepared(tmp_path, [{"instruction": "Do it.", "id": 3}])
