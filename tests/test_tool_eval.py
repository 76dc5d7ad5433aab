"""Tool calls in the audit, the preview, chat and evaluation: counted, marked, shown, scored.

Generated calls are read in each template's own syntax (lib/data/toolcalls.py); the audit counts tool calls,
tool results and reasoning blocks and the share of trained tokens in each, on the tiny tokenizer with
Qwen2.5's real template (tests/templates/qwen2.5.json).
"""

from __future__ import annotations

import json

import pytest

from lib.data.toolcalls import load_tools, parse_tool_call, reference_name, tool_call_metrics
from lib.run.errors import SFTError
from tests.test_templates import SPECS, with_template
from tests.test_tool_calling import TOOLS, A, U, call

WEATHER = {"name": "get_weather", "arguments": {"city": "Oslo"}}


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',  # Qwen2.5, Hermes 3
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3.1
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123def"}]',  # Mistral
    '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Oslo"}}\n]',  # Command
    'Sure. {"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}}',
])
def test_a_call_is_read_in_each_templates_syntax(text):
    assert parse_tool_call(text) == WEATHER


def test_no_call_and_broken_json_are_none():
    assert parse_tool_call("It is sunny in Oslo.") is None
    assert parse_tool_call('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>') is None
    assert parse_tool_call('{"city": "Oslo"}') is None  # JSON, but it names no function


def test_metrics_count_only_tool_call_references():
    refs = [json.dumps([WEATHER]), "A text answer.", json.dumps([{"name": "get_time", "arguments": {}}])]
    preds = ['<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', "whatever", "no call here"]
    assert reference_name(refs[1]) is None and reference_name(refs[2]) == "get_time"
    m = tool_call_metrics(preds, refs)
    assert m == {"tool_call_examples": 2, "tool_call_parse_rate": 0.5, "tool_name_match_rate": 0.5}
    assert tool_call_metrics(["x"], ["text"]) is None


def test_load_tools_from_a_file_or_a_list(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([TOOLS[0]["function"]]), encoding="utf-8")  # a bare schema is wrapped
    assert load_tools(str(path)) == [TOOLS[0]]
    assert load_tools(TOOLS) == TOOLS and load_tools(None) is None
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SFTError, match="bad.json"):
        load_tools(str(tmp_path / "bad.json"))


def test_eval_prompt_ends_before_the_first_call():
    from lib.data.prompts import prompt_messages

    msgs = [U("Weather in Oslo?"), A("", tool_calls=[call("get_weather", {"city": "Oslo"}, "call00001")]),
            {"role": "tool", "content": "8", "tool_call_id": "call00001"}, A("8 degrees.")]
    prompt, reference = prompt_messages(msgs)
    assert prompt == msgs[:1] and json.loads(reference) == [WEATHER]
    assert prompt_messages([U("q"), A("a")]) == ([U("q")], "a")


@pytest.fixture(scope="module")
def qwen_tiny(session_outputs):
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return with_template(AutoTokenizer.from_pretrained(tiny_model_path()), SPECS["qwen2.5"])


def test_generation_prompts_carry_each_records_tools(qwen_tiny):
    from lib.model.generation import eval_conversations, eval_tools, prompt_ids

    examples = [{"messages": [U("Weather in Oslo?"), A("", tool_calls=[call("get_weather", {"city": "Oslo"}, "c")])],
                 "tools": TOOLS}, {"messages": [U("Hi"), A("Hello")]}]
    chosen = eval_conversations(examples)
    tools = eval_tools(examples, chosen)
    assert tools == [TOOLS, None]
    (with_tools, _), (without, _) = prompt_ids(qwen_tiny, [c[1] for c in chosen], None, tools)
    assert "get_weather" in qwen_tiny.decode(with_tools) and "get_weather" not in qwen_tiny.decode(without)


def test_audit_counts_calls_results_reasoning_and_their_trained_tokens(qwen_tiny, tmp_path):
    from bench.tool_calling import make_records
    from lib.data.audit import audit, audit_table, split_for_template
    from lib.data.examples import prepare_examples

    records = make_records(6)
    records[0]["messages"][3] = A("It is warm.", reasoning_content="The tool says so.")
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepared = prepare_examples(str(path), eval_fraction=0.0)
    split_for_template(prepared, qwen_tiny, inline_reasoning=True)
    report = audit(prepared, qwen_tiny, 1024)
    tr = report["tools_and_reasoning"]
    assert (tr["tool_calls"], tr["tool_results"], tr["reasoning_blocks"]) == (6, 6, 1)
    share = tr["trained_token_share"]
    assert share["tool_calls"] > 0.3 and 0 < share["reasoning"] < 0.1 and share["tool_results"] == 0.0
    assert abs(share["tool_calls"] + share["reasoning"] + share["answers"] - 1) < 1e-3
    table = audit_table(report)
    assert table.loc["tool calls / tool results / reasoning blocks", "value"] == "6 / 6 / 1"


def test_chat_refuses_tools_where_the_template_renders_none(smol_tokenizer, qwen_tiny):
    from lib.ship.chat import check_tools, describe_call

    with pytest.raises(SFTError, match="does not render tools") as e:
        check_tools(smol_tokenizer, TOOLS)
    assert "\n" not in str(e.value)
    assert check_tools(qwen_tiny, TOOLS) == TOOLS and check_tools(smol_tokenizer, None) is None
    assert describe_call('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>') == \
        'tool call: get_weather {"city": "Oslo"} (not executed)'
    assert describe_call("It is sunny.") is None
