"""Tool-calling data sets in their own shapes, read into the OpenAI messages the chat templates take.

    from lib.data.toolsets import from_glaive, from_xlam
    c = from_glaive(rec, {})     # glaiveai/glaive-function-calling-v2: system + one `chat` string
    c = from_xlam(rec, {})       # Salesforce/xlam-function-calling-60k: query, tools and answers as JSON strings

glaive: `system` is "SYSTEM: <words> -" followed by the function schemas as JSON objects (the record's
tools; the words that introduce them give way to the chat template's own tool prompt, and a system text
without schemas stays the system message). `chat` is one string of turns opened by `USER:`,
`ASSISTANT:` and `FUNCTION RESPONSE:`; an assistant turn `<functioncall> {"name": ..., "arguments":
'{...}'}` (the arguments a JSON string in single quotes) becomes an assistant tool call, `FUNCTION
RESPONSE:` a tool turn named after the call it answers, and glaive's `<|endoftext|>` ends an answer
(the template writes its own). xlam: `query` is the user turn, `tools` the schemas (each
parameter's {type, description, default} kept, put under a JSON Schema "properties", the ones without a
default required), `answers` one assistant turn with every call in it (parallel calls).
Bad input raises DataError naming the record and the field.
"""

from __future__ import annotations

import json
import re

from lib.data.readers import RawRecord
from lib.data.turns import Converted, tools_list, type_name

_GLAIVE_TURN = re.compile(r"^(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?", re.MULTILINE)
_GLAIVE_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_GLAIVE_END = "<|endoftext|>"
_GLAIVE_CALL = "<functioncall>"
# {"name": "f", "arguments": '{"a": 1}'}: the arguments as a JSON string in single quotes (not JSON).
_QUOTED_ARGS = re.compile(r'^\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*\'(?P<args>.*)\'\s*\}$',
                          re.DOTALL)


def _json_objects(text: str) -> tuple[list, str]:
    """The JSON objects written one after another in `text` (glaive's function schemas), and the text before
    the first."""
    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    head = text if i < 0 else text[:i]
    while i >= 0:
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        rest = text[end:].lstrip()
        if rest and not rest.startswith("{"):
            raise ValueError(f"text after the function schemas: {rest[:40]!r}")
        i = text.find("{", end) if rest else -1
    return out, head


def glaive_system(rec: RawRecord, key: str = "system") -> tuple[str | None, list | None]:
    """(the system message, or None; the tool schemas, or None) of glaive's `system` field."""
    value = rec.record.get(key)
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise rec.error(f"expected a string, got {type_name(value)}", field=key)
    text = re.sub(r"^\s*SYSTEM:\s*", "", value)
    try:
        schemas, head = _json_objects(text)
    except ValueError as e:
        raise rec.error(f"the function schemas are not valid JSON ({str(e).splitlines()[0]})", field=key) from None
    if not schemas:
        return (text.strip() or None), None
    return None, tools_list(rec, schemas, key)


def _glaive_call(rec: RawRecord, text: str, where: str) -> dict:
    body = text.strip()
    m = _QUOTED_ARGS.match(body)
    try:
        if m:
            name, args = m["name"], json.loads(m["args"]) if m["args"].strip() else {}
        else:
            call = json.loads(body)
            name, args = call.get("name"), call.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) and args.strip() else args or {}
    except (ValueError, AttributeError) as e:
        raise rec.error(f"the <functioncall> is not a JSON object with name and arguments ({e})", field=where) from None
    if not isinstance(name, str) or not name.strip() or not isinstance(args, dict):
        raise rec.error("the <functioncall> needs a function name and its arguments as a JSON object", field=where)
    return {"type": "function", "function": {"name": name, "arguments": args}}


def glaive_turns(rec: RawRecord, key: str = "chat") -> list[dict]:
    """glaive's one-string chat as messages (see the module docstring)."""
    chat = rec.record.get(key)
    if not isinstance(chat, str):
        raise rec.error(f"expected the conversation as one string, got {type_name(chat)}", field=key)
    marks = list(_GLAIVE_TURN.finditer(chat))
    if not marks or chat[:marks[0].start()].strip():
        raise rec.error("expected turns opened by 'USER:', 'ASSISTANT:' or 'FUNCTION RESPONSE:' at the start of a "
                        "line", field=key)
    messages, last_call = [], None
    for n, (m, nxt) in enumerate(zip(marks, marks[1:] + [None]), start=1):
        role = _GLAIVE_ROLES[m[1]]
        text = chat[m.end():nxt.start() if nxt else len(chat)].strip()
        where = f"{key} (turn {n}, {m[1]})"
        if role == "assistant":
            text = text.removesuffix(_GLAIVE_END).rstrip()
            before, found, call = text.partition(_GLAIVE_CALL)
            if found:
                tool_call = _glaive_call(rec, call.replace(_GLAIVE_END, ""), where)
                last_call = tool_call["function"]["name"]
                messages.append({"role": "assistant", "content": before.strip(), "tool_calls": [tool_call]})
                continue
        if _GLAIVE_END in text:
            raise rec.error(f"'{_GLAIVE_END}' inside a {m[1]} turn", field=where)
        message = {"role": role, "content": text}
        if role == "tool" and last_call:
            message["name"] = last_call
        messages.append(message)
    return messages


def from_glaive(rec: RawRecord, cols: dict) -> Converted:
    system, tools = glaive_system(rec)
    messages = glaive_turns(rec)
    out = Converted({"messages": ([{"role": "system", "content": system}] if system else []) + messages})
    out.used["chat"] = ("the conversation: USER = user, ASSISTANT = answer (trained), <functioncall> = tool call "
                        "(trained), FUNCTION RESPONSE = tool result")
    if "system" in rec.record:
        out.used["system"] = ("the tool schemas (rendered by the chat template; its words introducing them give way "
                              "to the template's own)" if tools else "system message")
    if tools:
        out.example["tools"] = tools
    return out


def _xlam_json(rec: RawRecord, key: str) -> list:
    value = rec.record.get(key)
    if value is None:
        raise rec.error("missing field", field=key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise rec.error(f"expected a JSON list in the string ({e})", field=key) from None
    if not isinstance(value, list):
        raise rec.error(f"expected a list, got {type_name(value)}", field=key)
    return value


def xlam_tool(tool) -> dict:
    """xlam's {name, description, parameters: {p: {type, description, default?}}} as a JSON Schema function."""
    params = tool.get("parameters") if isinstance(tool, dict) else None
    if not isinstance(params, dict) or params.get("type") == "object":
        return tool
    required = [p for p, spec in params.items() if not (isinstance(spec, dict) and "default" in spec)]
    return {**tool, "parameters": {"type": "object", "properties": params, "required": required}}


def from_xlam(rec: RawRecord, cols: dict) -> Converted:
    query = rec.record.get("query")
    if not isinstance(query, str):
        raise rec.error(f"expected the user's query as a string, got {type_name(query)}", field="query")
    tools = tools_list(rec, [xlam_tool(t) for t in _xlam_json(rec, "tools")], "tools")
    calls = []
    for j, answer in enumerate(_xlam_json(rec, "answers"), start=1):
        where = f"answers[{j}]"
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str) or not answer["name"].strip():
            raise rec.error("expected a call {\"name\": ..., \"arguments\": {...}}", field=where)
        args = answer.get("arguments") or {}
        if not isinstance(args, dict):
            raise rec.error(f"the call's arguments must be a JSON object, got {type_name(args)}", field=where)
        calls.append({"type": "function", "function": {"name": answer["name"], "arguments": args}})
    if not calls:
        raise rec.error("no call in the answers (nothing to learn from)", field="answers")
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": "", "tool_calls": calls}]
    used = {"query": "user turn", "tools": "the tool schemas (rendered by the chat template, never trained)",
            "answers": "assistant turn: the tool calls, in parallel when several (trained)"}
    return Converted({"messages": messages, "tools": tools}, used)
