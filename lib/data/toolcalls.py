"""Tool calls in generated text: read the call a model made, score calls against references, load tools.

    from lib.data.toolcalls import parse_tool_call, tool_call_metrics, load_tools
    parse_tool_call('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    # -> {"name": "get_weather", "arguments": {"city": "Oslo"}}
    tool_call_metrics(["<generated text>", ...], ['[{"name": "get_weather", ...}]', None, ...])
    load_tools("tools.json")          # a JSON list of tool schemas (OpenAI format), or the list itself

One reader for every template's call syntax, by what they share: the call is the first JSON value
in the reply that names a function. Qwen2.5 / Hermes / SmolLM3 write `<tool_call>{"name", "arguments"}
</tool_call>`, Llama 3.1 a bare `{"name", "parameters"}`, Mistral `[TOOL_CALLS][{"name", "arguments"}]`,
Command A `[{"tool_name", "parameters"}]`, OpenAI-style objects `{"function": {"name", "arguments"}}`.
Nothing is executed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lib.data.readers import read_json_file
from lib.run.errors import SFTError

_NAME_KEYS = ("name", "tool_name")
_ARG_KEYS = ("arguments", "parameters")


def _call_of(value) -> dict | None:
    """{"name", "arguments"} of a decoded JSON value that is a call (or a list whose first item is one)."""
    if isinstance(value, list):
        return _call_of(value[0]) if value else None
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):
        return _call_of(value["function"])
    name = next((value[k] for k in _NAME_KEYS if isinstance(value.get(k), str)), None)
    if name is None:
        return None
    args = next((value[k] for k in _ARG_KEYS if k in value), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": name, "arguments": args}


def json_values(text: str):
    """Every JSON object or array that starts somewhere in `text`, in order (decoded)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text or ""):
        if ch in "{[":
            try:
                yield decoder.raw_decode(text, i)[0]
            except ValueError:
                continue


def parse_tool_call(text: str) -> dict | None:
    """The first tool call in generated `text` as {"name", "arguments"}, or None when no JSON value in it
    names a function."""
    for value in json_values(text):
        call = _call_of(value)
        if call is not None:
            return call
    return None


def reference_name(reference: str | None) -> str | None:
    """The function a reference names: references of tool-calling turns are JSON lists of {"name", "arguments"}
    (lib.data.tokenization.prompt_messages); None for a text answer."""
    if not reference or not reference.lstrip().startswith("["):
        return None
    try:
        call = _call_of(json.loads(reference))
    except ValueError:
        return None
    return call["name"] if call else None


def tool_call_metrics(predictions: list[str], references: list[str | None]) -> dict | None:
    """For the examples whose reference is a tool call: how often the generated text holds a call that
    parses as JSON (`tool_call_parse_rate`) and how often it names the reference function
    (`tool_name_match_rate`). None when no reference is a tool call."""
    pairs = [(p, name) for p, r in zip(predictions, references) if (name := reference_name(r)) is not None]
    if not pairs:
        return None
    calls = [parse_tool_call(p) for p, _ in pairs]
    n = len(pairs)
    return {"tool_call_examples": n,
            "tool_call_parse_rate": sum(c is not None for c in calls) / n,
            "tool_name_match_rate": sum(c is not None and c["name"] == name for c, (_, name) in zip(calls, pairs)) / n}


def load_tools(tools) -> list[dict] | None:
    """Tool schemas from a list, or a path to a JSON file holding the list (or {"tools": [...]}). Bare
    {"name", "description", "parameters"} entries are wrapped as {"type": "function", "function": ...}."""
    if tools is None:
        return None
    if isinstance(tools, (str, Path)):
        tools = read_json_file(Path(tools))  # the data reader's checks and one-line errors
        if isinstance(tools, dict) and "tools" in tools:
            tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SFTError("tools: expected a JSON list of tool schemas ({\"type\": \"function\", \"function\": {...}})")
    out = []
    for t in tools:
        if "function" not in t and "name" in t:
            t = {"type": "function", "function": t}
        name = t["function"].get("name") if isinstance(t.get("function"), dict) else None
        if not isinstance(name, str) or not name.strip():
            raise SFTError(f"tools: a schema without a function name (a non-empty text): {json.dumps(t)[:80]}")
        out.append(t)
    return out or None
