"""The turns of a conversation as the data gives them: roles, content, per-turn weights, tool calls and
tool results, reasoning, read into messages the chat template takes.

    from lib.data.turns import read_turns, Converted
    out = Converted({})
    messages = read_turns(rec, rec.record["messages"], "messages", out)

Per-turn `weight` (OpenAI fine-tuning, OpenHermes / SlimOrca ShareGPT) is kept: 0 on an answer
makes it context, never trained; 1 or null trains it. Tool calling, in the OpenAI format that
transformers' `apply_chat_template` takes: assistant messages with `tool_calls` (`arguments` as a
JSON string or an object, kept as an object; content null or empty becomes ""), `tool` messages
(the result, with `tool_call_id` / `name` when given), and a record-level `tools` list
(`tools_list`). ShareGPT's `function_call` turn becomes an assistant message with `tool_calls`, its
`observation` turn a `tool` message. Reasoning in a separate field (`reasoning_content`,
`thinking`, `reasoning`) is kept as the message's `reasoning_content`. Bad input raises DataError
naming the record and the turn's field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lib.data.readers import RawRecord

ROLES = ("system", "user", "assistant", "tool")
# Roles of a tool's result (OpenAI's tool and legacy function, Llama 3.1's ipython, ShareGPT's
# observation) and of a tool call written as a turn of its own (LLaMA-Factory's ShareGPT function_call).
TOOL_RESULT_ROLES = {"tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}
CALL_ROLE = "function_call"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant", **TOOL_RESULT_ROLES,
                  CALL_ROLE: CALL_ROLE}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")

TURN_METADATA = frozenset({"id", "message_id", "timestamp", "created_at", "model", "lang", "language", "score",
                           "quality", "labels", "tags", "turn", "turn_id"})

# ----------------------------------------------------------------------------- values


def type_name(v) -> str:
    return {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def string_field(rec: RawRecord, key: str, required: bool = True, what: str = "field") -> str | None:
    r = rec.record
    if key not in r or r[key] is None:
        if required:
            raise rec.error(f"missing {what}", field=key)
        return None
    v = r[key]
    if not isinstance(v, str):
        raise rec.error(f"expected a string, got {type_name(v)}", field=key)
    return v


def _part_value(rec: RawRecord, part: dict, where: str):
    """A part's string: OpenAI's "text" key, or LLaMA-Factory v1's "value"."""
    key = "text" if "text" in part or "value" not in part else "value"
    if not isinstance(part.get(key), str):
        raise rec.error(f"expected a string, got {type_name(part.get(key))}", field=f"{where}.{key}")
    return part[key]


def content_parts(rec: RawRecord, parts: list, key: str) -> tuple[str, str | None, list]:
    """Content given as a list of parts, the OpenAI format [{"type": "text", "text": ...}, ...] or LLaMA-Factory
    v1's [{"type": "text" | "reasoning" | "tool_call", "value": ...}, ...]: (the text parts joined with
    newlines, as vLLM joins them; the reasoning parts joined, or None; the tool calls). Any other part
    (image_url, image, input_audio, file, tools...) is refused: a text model cannot be trained on it."""
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(parts, start=1):
        where = f"{key}[{j}]"
        if not isinstance(part, dict):
            raise rec.error(f"expected a content part {{\"type\": \"text\", \"text\": ...}}, got {type_name(part)}",
                            field=where)
        kind = part.get("type")
        if kind == "text":
            texts.append(_part_value(rec, part, where))
        elif kind == "reasoning":
            reasoning.append(_part_value(rec, part, where))
        elif kind == "tool_call":
            calls.append(_tool_call(rec, _json(rec, _part_value(rec, part, where), where, "the tool call"), where))
        else:
            raise rec.error(f"a content part of type {kind!r} is not supported: text, reasoning and tool_call parts "
                            "are (remove images, audio and files from the data, or export them as text)", field=where)
    if not (texts or reasoning or calls):
        raise rec.error("the list of content parts is empty", field=key)
    return "\n".join(texts), ("\n".join(reasoning) if reasoning else None), calls


def _weight(rec: RawRecord, turn: dict, key: str, where: str, role: str) -> int | None:
    """A turn's weight as 0 or 1 (None when absent or null). 1 on a turn that is not an answer is refused:
    only assistant answers are trained."""
    if key not in turn or turn[key] is None:
        return None
    w = turn[key]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise rec.error(f"weight must be 0 (context, not trained) or 1 (trained), or null; got {w!r}",
                        field=f"{where}.{key}")
    if w == 1 and role != "assistant":
        raise rec.error(f"weight 1 on a {role} turn: only assistant answers are trained (set it to 0 or null)",
                        field=f"{where}.{key}")
    return int(w)


@dataclass
class Converted:
    """One record's example, the fields it was made from (field -> what it became), and the keys of its
    turns that nothing uses ('messages[].name' -> a value), for the field account."""

    example: dict
    used: dict = field(default_factory=dict)
    turn_extras: dict = field(default_factory=dict)
    dropped_turns: int = 0  # assistant turns that opened the conversation before any user turn (dropped)


def _json(rec: RawRecord, value, where: str, what: str):
    """`value` parsed when it is a JSON string, else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise rec.error(f"{what} are not valid JSON ({e.msg} at character {e.pos + 1})", field=where) from None


def _tool_call(rec: RawRecord, call, where: str) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments": {...}}} (plus its "id"):
    OpenAI's form, or the bare {"name", "arguments"} of Glaive / LLaMA-Factory; arguments as an object."""
    if not isinstance(call, dict):
        raise rec.error(f"expected a tool call {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}, "
                        f"got {type_name(call)}", field=where)
    fn, fwhere = (call["function"], f"{where}.function") if "function" in call else (call, where)
    if call.get("type", "function") != "function":
        raise rec.error(f"a tool call of type {call.get('type')!r}: only function calls can be trained",
                        field=f"{where}.type")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise rec.error("a tool call needs the function's name (a non-empty string)", field=f"{fwhere}.name")
    args = fn.get("arguments", fn.get("parameters"))
    args = {} if args is None or (isinstance(args, str) and not args.strip()) else _json(
        rec, args, f"{fwhere}.arguments", "the tool call's arguments")
    if not isinstance(args, dict):
        raise rec.error(f"the tool call's arguments must be a JSON object, got {type_name(args)}",
                        field=f"{fwhere}.arguments")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise rec.error(f"expected a string, got {type_name(call['id'])}", field=f"{where}.id")
        out["id"] = call["id"]
    return out


def _tool_calls(rec: RawRecord, calls, where: str) -> list[dict]:
    calls = _json(rec, calls, where, "the tool calls")
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise rec.error("the list of tool calls is empty", field=where)
    return [_tool_call(rec, c, f"{where}[{j}]") for j, c in enumerate(calls, start=1)]


def tools_list(rec: RawRecord, value, key: str) -> list[dict]:
    """A record's tool schemas: a list (or a JSON string of one, LLaMA-Factory) of OpenAI tools
    {"type": "function", "function": {"name", "description", "parameters"}} or bare function schemas."""
    value = _json(rec, value, key, "the tool schemas")
    if not isinstance(value, list):
        raise rec.error(f"expected a list of tool schemas, got {type_name(value)}", field=key)
    out = []
    for j, tool in enumerate(value, start=1):
        where = f"{key}[{j}]"
        fn = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise rec.error(f"a tool of type {tool.get('type')!r}: only function tools can be rendered", field=where)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise rec.error("expected a tool schema with a name ({\"type\": \"function\", \"function\": "
                            "{\"name\", \"description\", \"parameters\"}})", field=where)
        out.append({"type": "function", "function": fn})
    return out


def _content(rec: RawRecord, content, where: str, role: str, calls: bool) -> str:
    if content is None:
        if calls:  # an assistant turn that only calls tools
            return ""
        raise rec.error("missing content", field=where)
    if role == "tool" and isinstance(content, dict):  # a result given as an object: its JSON text
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise rec.error(f"expected a string or a list of text parts, got {type_name(content)}", field=where)
    return content


def _message(rec: RawRecord, turn: dict, where: str, role: str, content_key: str) -> tuple[dict, set]:
    """One turn as a message (tool calls, tool results, reasoning in the OpenAI form), and the turn's keys it used."""
    used: set = set()
    message: dict = {}
    parts = None  # the content given as a list of parts
    if role == CALL_ROLE:  # ShareGPT: the call(s) as JSON in the turn's text
        message = {"role": "assistant", "content": "",
                   "tool_calls": _tool_calls(rec, turn.get(content_key), f"{where}.{content_key}")}
        role = "assistant"
    else:
        calls = next((k for k in ("tool_calls", "function_call") if turn.get(k)), None)
        if calls and role != "assistant":
            raise rec.error(f"tool calls on a {role} turn: only assistant turns call tools", field=f"{where}.{calls}")
        content = turn.get(content_key)
        parts = content_parts(rec, content, f"{where}.{content_key}") if isinstance(content, list) else None
        message = {"role": role, "content": parts[0] if parts else _content(
            rec, content, f"{where}.{content_key}", role, calls is not None)}
        if calls:
            message["tool_calls"] = _tool_calls(rec, turn[calls], f"{where}.{calls}")
        used |= {"tool_calls", "function_call"}
    if role == "tool":
        for k in ("tool_call_id", "name"):
            if turn.get(k) is not None:
                if not isinstance(turn[k], str):
                    raise rec.error(f"expected a string, got {type_name(turn[k])}", field=f"{where}.{k}")
                message[k] = turn[k]
            used.add(k)
    elif turn.get("tool_call_id"):
        raise rec.error(f"tool_call_id on a {role} turn: only tool results answer a call", field=f"{where}.tool_call_id")
    reasoning = {k: turn[k] for k in REASONING_KEYS if turn.get(k) not in (None, "")}
    if reasoning:
        k, v = next(iter(reasoning.items()))
        if role != "assistant":
            raise rec.error(f"reasoning on a {role} turn: only assistant answers reason", field=f"{where}.{k}")
        if not isinstance(v, str):
            raise rec.error(f"expected the reasoning as a string, got {type_name(v)}", field=f"{where}.{k}")
        if len(set(reasoning.values())) > 1:
            raise rec.error(f"two different reasonings ({', '.join(reasoning)}): keep one", field=f"{where}.{k}")
        message["reasoning_content"] = v
    used |= set(REASONING_KEYS)
    if parts:
        _add_parts(rec, message, parts, f"{where}.{content_key}")
    return message, used


def _add_parts(rec: RawRecord, message: dict, parts: tuple, where: str) -> None:
    """The reasoning and tool-call parts of a turn's content (LLaMA-Factory v1) into the message."""
    _, reasoning, calls = parts
    if (reasoning is not None or calls) and message["role"] != "assistant":
        kind = "reasoning" if reasoning is not None else "tool_call"
        raise rec.error(f"a {kind} part on a {message['role']} turn: only assistant answers reason and call tools",
                        field=where)
    if calls:
        message["tool_calls"] = message.get("tool_calls", []) + calls
    if reasoning is not None:
        if message.get("reasoning_content") not in (None, reasoning):
            raise rec.error("two different reasonings (a reasoning part and a reasoning field): keep one", field=where)
        message["reasoning_content"] = reasoning


def read_turns(rec: RawRecord, turns, key: str, out: Converted, role_key="role", content_key="content",
           weight_key="weight", role_map=None) -> list[dict]:
    """A list of turns as messages: roles checked (or mapped), content as text, weights kept, tool calls
    and results and reasoning in the OpenAI form (see the module docstring)."""
    if not isinstance(turns, list):
        raise rec.error(f"expected a list of turns, got {type_name(turns)}", field=key)
    if not turns:
        raise rec.error("the conversation is empty", field=key)
    known = {role_key, content_key, weight_key}
    messages = []
    if weight_key == "weight" and any(isinstance(t, dict) and "loss_weight" in t and "weight" not in t for t in turns):
        weight_key = "loss_weight"  # LLaMA-Factory v1's name of the turn's weight
        known.add(weight_key)
    for i, turn in enumerate(turns, start=1):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise rec.error(f"expected an object with '{role_key}' and '{content_key}', got {type_name(turn)}",
                            field=where)
        raw_role = turn.get(role_key)
        roles = role_map if role_map is not None else {**{r: r for r in ROLES}, **TOOL_RESULT_ROLES}
        if raw_role not in roles:
            what = "speaker" if role_map is not None else "role"
            expected = role_map if role_map is not None else ROLES
            raise rec.error(f"unknown {what} {raw_role!r} (expected one of {', '.join(expected)})",
                            field=f"{where}.{role_key}")
        role = roles[raw_role]
        message, used = _message(rec, turn, where, role, content_key)
        role = message["role"]
        used |= known
        if _weight(rec, turn, weight_key, where, role) == 0 and role == "assistant":
            message["weight"] = 0
        messages.append(message)
        for k, v in turn.items():
            if k not in used and k not in TURN_METADATA:
                out.turn_extras.setdefault(f"{key}[].{k}", v)
    return messages


def read_pairs(rec: RawRecord, value, key: str, first: str, second: str) -> list[dict]:
    """[[user, answer], ...] (LLaMA-Factory history) or [{first: user, second: answer}, ...] (Capybara)."""
    if not isinstance(value, list):
        raise rec.error(f"expected a list of [user, answer] pairs, got {type_name(value)}", field=key)
    messages = []
    for i, pair in enumerate(value, start=1):
        where = f"{key}[{i}]"
        if isinstance(pair, dict):
            pair = [pair.get(first), pair.get(second)]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise rec.error(f"expected a pair [user, answer], got {type_name(pair)}", field=where)
        for j, (role, text) in enumerate(zip(("user", "assistant"), pair), start=1):
            if not isinstance(text, str):
                raise rec.error(f"expected the {role} text as a string, got {type_name(text)}", field=f"{where}[{j}]")
            messages.append({"role": role, "content": text})
    return messages
