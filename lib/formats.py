"""Record shapes: which shape a record has, the conversation it holds, and where each field went.

    from lib.formats import detect_format, convert
    fmt = detect_format(raw)                  # 'dolly', 'sharegpt', ...; 'columns' when data.columns is set
    c = convert(raw, fmt, columns=None)       # c.example: {"messages": [...], "metadata": {...}}; c.used

A shape names the fields it uses (and what for) and the fields it knows to be metadata. Any other
field is handed to `FieldAccount` (lib/fields.py), which counts it over the whole file so that
prepare can refuse a text field nothing uses instead of training without it. Every built-in shape
is a column mapping (the roles of `data.columns`: prompt, input, response, system, history,
messages, role, content, weight, text, and the role values user_tag, assistant_tag, system_tag)
or a small converter of its own (Socratic question lists, Capybara pairs, preference data).

Per-turn `weight` (OpenAI fine-tuning, OpenHermes / SlimOrca ShareGPT) is kept: 0 on an answer
makes it context, never trained; 1 or null trains it.

Tool calling, in the OpenAI format that transformers' `apply_chat_template` takes: a record-level
`tools` list (JSON schemas; a bare `{"name", "description", "parameters"}` or a JSON string of the
list, as LLaMA-Factory writes it, is wrapped as `{"type": "function", "function": {...}}`),
assistant messages with `tool_calls` (`arguments` as a JSON string or an object, kept as an
object; content null or empty becomes ""), and `tool` messages (the result, with `tool_call_id` /
`name` when given). ShareGPT's `function_call` turn (the call as JSON) becomes an assistant
message with `tool_calls`, its `observation` turn a `tool` message; OpenAI's legacy
`function_call` key and `function` role map the same way. Reasoning in a separate field
(`reasoning_content`, `thinking`, `reasoning`) is kept as the message's `reasoning_content`; the
chat template renders it (lib/tokenization.py), never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import SFTError
from .readers import RawRecord
from .settings import COLUMN_ROLES

ROLES = ("system", "user", "assistant", "tool")
# Roles of a tool's result (OpenAI's tool and legacy function, Llama 3.1's ipython, ShareGPT's
# observation) and of a tool call written as a turn of its own (LLaMA-Factory's ShareGPT function_call).
TOOL_RESULT_ROLES = {"tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}
CALL_ROLE = "function_call"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant", **TOOL_RESULT_ROLES,
                  CALL_ROLE: CALL_ROLE}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")

# Fields any shape treats as metadata: identifiers, provenance, labels. Kept in each example's
# "metadata" (data/train.jsonl), never given to the model.
METADATA = frozenset({
    "id", "_id", "idx", "index", "uid", "uuid", "instance_id", "prompt_id", "conversation_id", "conv_id",
    "example_id", "task_id", "source", "sources", "dataset", "data_source", "origin", "category", "categories",
    "task", "task_type", "type", "subset", "split", "lang", "language", "license", "url", "hash", "timestamp",
    "created_at", "model", "model_name", "models", "tags", "label", "labels", "score", "scores", "quality",
    "domain", "topic", "difficulty", "level", "turn", "turns", "num_turns", "length",
})
TURN_METADATA = frozenset({"id", "message_id", "timestamp", "created_at", "model", "lang", "language", "score",
                           "quality", "labels", "tags", "turn", "turn_id"})

# ----------------------------------------------------------------------------- values


def type_name(v) -> str:
    return {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def _string(rec: RawRecord, key: str, required: bool = True, what: str = "field") -> str | None:
    r = rec.record
    if key not in r or r[key] is None:
        if required:
            raise rec.error(f"missing {what}", field=key)
        return None
    v = r[key]
    if not isinstance(v, str):
        raise rec.error(f"expected a string, got {type_name(v)}", field=key)
    return v


def _text_parts(rec: RawRecord, parts: list, key: str) -> str:
    """Content given as a list of parts (the OpenAI format, [{"type": "text", "text": ...}, ...]):
    the text parts joined with newlines (as vLLM joins them). Any other part (image_url, image,
    input_audio, file, refusal...) is refused: a text model cannot be trained on it."""
    texts = []
    for j, part in enumerate(parts, start=1):
        where = f"{key}[{j}]"
        if not isinstance(part, dict):
            raise rec.error(f"expected a content part {{\"type\": \"text\", \"text\": ...}}, got {type_name(part)}",
                            field=where)
        kind = part.get("type")
        if kind != "text":
            raise rec.error(f"a content part of type {kind!r}: only text parts can be trained on (remove "
                            "images, audio and files from the data, or export it as text)", field=where)
        text = part.get("text")
        if not isinstance(text, str):
            raise rec.error(f"expected a string, got {type_name(text)}", field=f"{where}.text")
        texts.append(text)
    if not texts:
        raise rec.error("the list of content parts is empty", field=key)
    return "\n".join(texts)


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
    if isinstance(content, list):
        return _text_parts(rec, content, where)
    if role == "tool" and isinstance(content, dict):  # a result given as an object: its JSON text
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise rec.error(f"expected a string or a list of text parts, got {type_name(content)}", field=where)
    return content


def _message(rec: RawRecord, turn: dict, where: str, role: str, content_key: str) -> tuple[dict, set]:
    """One turn as a message (tool calls, tool results, reasoning in the OpenAI form), and the turn's keys it used."""
    used: set = set()
    message: dict = {}
    if role == CALL_ROLE:  # ShareGPT: the call(s) as JSON in the turn's text
        message = {"role": "assistant", "content": "",
                   "tool_calls": _tool_calls(rec, turn.get(content_key), f"{where}.{content_key}")}
        role = "assistant"
    else:
        calls = next((k for k in ("tool_calls", "function_call") if turn.get(k)), None)
        if calls and role != "assistant":
            raise rec.error(f"tool calls on a {role} turn: only assistant turns call tools", field=f"{where}.{calls}")
        message = {"role": role, "content": _content(rec, turn.get(content_key), f"{where}.{content_key}",
                                                     role, calls is not None)}
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
    return message, used


def _turns(rec: RawRecord, turns, key: str, out: Converted, role_key="role", content_key="content",
           weight_key="weight", role_map=None) -> list[dict]:
    """A list of turns as messages: roles checked (or mapped), content as text, weights kept, tool calls
    and results and reasoning in the OpenAI form (see the module docstring)."""
    if not isinstance(turns, list):
        raise rec.error(f"expected a list of turns, got {type_name(turns)}", field=key)
    if not turns:
        raise rec.error("the conversation is empty", field=key)
    known = {role_key, content_key, weight_key}
    messages = []
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


def _pairs(rec: RawRecord, value, key: str, first: str, second: str) -> list[dict]:
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


# ----------------------------------------------------------------------------- mapped shapes


def _role_map(cols: dict) -> dict | None:
    if not any(k in cols for k in ("role", "user_tag", "assistant_tag", "system_tag")):
        return None
    out = dict(SHAREGPT_ROLES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
        if tag in cols:
            out[cols[tag]] = role
    return out


def _side(rec: RawRecord, key: str, out: Converted, cols: dict, role: str) -> list[dict]:
    """The prompt or the response: a string (one turn) or a list of turns (TRL's conversational form)."""
    value = rec.record.get(key)
    if isinstance(value, list):
        return _turns(rec, value, key, out, cols.get("role", "role"), cols.get("content", "content"),
                      cols.get("weight", "weight"), _role_map(cols))
    text = _string(rec, key, what="answer" if role == "assistant" else "field")
    return [{"role": role, "content": text}]


def from_columns(rec: RawRecord, cols: dict) -> Converted:
    """A record read through a column mapping (role -> field; see COLUMN_ROLES)."""
    r, out = rec.record, Converted({})
    if "text" in cols:
        out.example = {"text": _string(rec, cols["text"])}
        out.used[cols["text"]] = COLUMN_ROLES["text"]
        return out
    messages = []
    system = _string(rec, cols["system"], required=False) if "system" in cols else None
    if system is not None:
        out.used[cols["system"]] = COLUMN_ROLES["system"]
        if system.strip():
            messages.append({"role": "system", "content": system})
    if "messages" in cols:
        key = cols["messages"]
        if key not in r:
            raise rec.error("missing field", field=key)
        turns = _turns(rec, r[key], key, out, cols.get("role", "role"), cols.get("content", "content"),
                       cols.get("weight", "weight"), _role_map(cols))
        if messages and turns[0]["role"] == "system":
            raise rec.error(f"two system messages: one in '{cols['system']}' and one opening the conversation",
                            field=key)
        messages += turns
        out.used[key] = COLUMN_ROLES["messages"]
    else:
        if r.get(cols.get("history")) is not None:
            messages += _pairs(rec, r[cols["history"]], cols["history"], "0", "1")
            out.used[cols["history"]] = COLUMN_ROLES["history"]
        prompt = _side(rec, cols["prompt"], out, cols, "user")
        out.used[cols["prompt"]] = COLUMN_ROLES["prompt"]
        inp = _string(rec, cols["input"], required=False) if "input" in cols else None
        if inp is not None:
            out.used[cols["input"]] = COLUMN_ROLES["input"]
            if inp.strip():
                prompt[-1] = dict(prompt[-1], content=f"{prompt[-1]['content']}\n\n{inp}")
        if cols["response"] not in r or r[cols["response"]] is None:
            raise rec.error("missing answer", field=cols["response"])
        messages += prompt + _side(rec, cols["response"], out, cols, "assistant")
        out.used[cols["response"]] = COLUMN_ROLES["response"]
    if not any(m["role"] == "assistant" for m in messages):
        raise rec.error("the conversation has no assistant turn (nothing to learn from)",
                        field=cols.get("messages") or cols.get("response"))
    out.example = {"messages": messages}
    if cols.get("tools") and r.get(cols["tools"]) not in (None, "", []):
        out.example["tools"] = tools_list(rec, r[cols["tools"]], cols["tools"])
        out.used[cols["tools"]] = COLUMN_ROLES["tools"]
    return out


def _socratic(rec: RawRecord, cols: dict) -> Converted:
    r = rec.record
    instruction = _string(rec, "instruction")
    if "output" not in r or r["output"] is None:
        raise rec.error("missing answer (the list of questions)", field="output")
    questions = r["output"]
    if not isinstance(questions, list):
        raise rec.error(f"expected a list of questions, got {type_name(questions)}", field="output")
    if not questions:
        raise rec.error("the list of questions is empty", field="output")
    for i, q in enumerate(questions, start=1):
        if not isinstance(q, str):
            raise rec.error(f"question {i} is {type_name(q)}, expected a string", field=f"output[{i}]")
    answer = "\n".join(q.strip() for q in questions if q.strip())
    used = {"instruction": "user turn", "output": "assistant answer: the questions, one a line (trained)"}
    return Converted({"messages": [{"role": "user", "content": instruction},
                                   {"role": "assistant", "content": answer}]}, used)


def _qa(rec: RawRecord, cols: dict) -> Converted:
    lower = {k.lower(): k for k in rec.record}
    return from_columns(rec, {"prompt": lower.get("question", "Question"), "response": lower.get("answer", "Answer")})


def _capybara(rec: RawRecord, cols: dict) -> Converted:
    if "conversation" not in rec.record:
        raise rec.error("missing field", field="conversation")
    messages = _pairs(rec, rec.record["conversation"], "conversation", "input", "output")
    if not messages:
        raise rec.error("the conversation is empty", field="conversation")
    return Converted({"messages": messages}, {"conversation": "the conversation: input = user, output = answer (trained)"})


_REJECTED = "not trained: the rejected answer (SFT learns the chosen one; preferences need DPO)"


def _preference(rec: RawRecord, cols: dict) -> Converted:
    """The prompt (prompt, instruction + input, or ShareGPT conversations) and the chosen answer (text, one
    turn, or turns; a whole conversation when it opens with a user turn); rejected is counted, never trained."""
    r, out = rec.record, Converted({})
    if r.get("chosen") is None:
        raise rec.error("missing answer", field="chosen")
    chosen = [r["chosen"]] if isinstance(r["chosen"], dict) else r["chosen"]
    sharegpt = "conversations" in r or (isinstance(chosen, list) and chosen and isinstance(chosen[0], dict)
                                        and "from" in chosen[0])
    how = ("from", "value", "weight", SHAREGPT_ROLES) if sharegpt else ()
    if isinstance(chosen, list):
        answer = _turns(rec, chosen, "chosen", out, *how)
    else:
        answer = [{"role": "assistant", "content": _string(rec, "chosen", what="answer")}]
    prompt_key = next((k for k in ("prompt", "instruction", "conversations") if k in r), None)
    if answer[0]["role"] != "assistant":  # the whole conversation (implicit prompt, UltraFeedback)
        first_user = next((m["content"] for m in answer if m["role"] == "user"), None)
        if prompt_key is not None and r[prompt_key] != first_user:
            raise rec.error(f"'chosen' holds a whole conversation whose first user turn differs from "
                            f"'{prompt_key}': which prompt to train on is unclear", field=prompt_key)
        if prompt_key is not None:
            out.used[prompt_key] = "same text as the first user turn"
        messages = answer
    elif prompt_key is None:
        raise rec.error("'chosen' has no prompt beside it ('prompt', 'instruction' or 'conversations'), so the "
                        "answer cannot be told from the question; add the prompt, or train the whole text as "
                        "plain text with data.columns={text: chosen}", field="chosen")
    else:
        value = r[prompt_key]
        if isinstance(value, list):
            messages = _turns(rec, value, prompt_key, out, *how) + answer
        else:
            text = _string(rec, prompt_key)
            if prompt_key == "instruction" and isinstance(r.get("input"), str):
                out.used["input"] = COLUMN_ROLES["input"]
                text = f"{text}\n\n{r['input']}" if r["input"].strip() else text
            messages = [{"role": "user", "content": text}] + answer
        out.used[prompt_key] = "the prompt: the turns before the answer"
    out.used["chosen"] = "assistant answer (trained)"
    if "rejected" in r:
        out.used["rejected"] = _REJECTED
    out.example = {"messages": messages}
    return out


# ----------------------------------------------------------------------------- the shapes


@dataclass(frozen=True)
class Shape:
    """A record shape: the fields that identify it, how it converts, the fields it knows as metadata."""

    name: str
    description: str
    fields: tuple[str, ...]
    convert: Callable[[RawRecord, dict], Converted]
    columns: dict = field(default_factory=dict)
    metadata: frozenset = frozenset()
    when: Callable[[dict], bool] | None = None

    def matches(self, record: dict, lower_keys: set[str]) -> bool:
        keys = lower_keys if self.name == "qa_splits" else set(record)
        return all(f in keys for f in self.fields) and (self.when is None or self.when(record))


def _mapped(columns: dict) -> Callable[[RawRecord, dict], Converted]:
    return lambda rec, _cols: from_columns(rec, columns)


_ALPACA = {"prompt": "instruction", "input": "input", "system": "system", "history": "history"}
SHAPES = {s.name: s for s in [
    Shape("messages", "messages (a list of {role, content}; UltraChat, no_robots, OpenAI chat)", ("messages",),
          _mapped({"messages": "messages", "tools": "tools"})),
    Shape("sharegpt", "sharegpt (conversations: a list of {from, value}; OpenHermes, SlimOrca)", ("conversations",),
          _mapped({"messages": "conversations", "role": "from", "content": "value", "system": "system",
                   "tools": "tools"})),
    Shape("capybara", "capybara (conversation: a list of {input, output})", ("conversation",), _capybara,
          when=lambda r: isinstance(r.get("conversation"), list)),
    Shape("qa_splits", "qa_splits (Question + Answer, optionally in {\"train\": [...], \"test\": [...]})",
          ("question", "answer"), _qa),
    Shape("socratic", "socratic (instruction + output: a list of questions)", ("instruction", "output"), _socratic,
          when=lambda r: isinstance(r.get("output"), list)),
    Shape("instruction_output", "instruction_output (instruction + output; optional input, system, history)",
          ("instruction", "output"), _mapped({**_ALPACA, "response": "output"}),
          when=lambda r: not isinstance(r.get("output"), list)),
    Shape("instruction_response", "instruction_response (instruction + response; optional input, system, history)",
          ("instruction", "response"), _mapped({**_ALPACA, "response": "response"})),
    Shape("dolly", "dolly (instruction + context + response)", ("instruction", "context", "response"),
          _mapped({"prompt": "instruction", "input": "context", "response": "response"})),
    Shape("query_response", "query_response (query + response; MetaMathQA)", ("query", "response"),
          _mapped({"prompt": "query", "response": "response"}), metadata=frozenset({"original_question"})),
    Shape("prompt_completion", "prompt_completion (prompt + completion)", ("prompt", "completion"),
          _mapped({"prompt": "prompt", "response": "completion"})),
    Shape("preference", "preference (prompt + chosen + rejected: chosen is trained)", ("chosen", "rejected"),
          _preference),
    Shape("text", "text (plain text, language modelling)", ("text",), _mapped({"text": "text"})),
]}
FORMATS = {**{name: s.description for name, s in SHAPES.items()},
           "columns": "columns (data.columns maps your fields to the roles)"}
# A shape tried only when no other matches: a `text` field beside another shape's fields is that shape's
# record (and the text a rendering of it, or a field to map or ignore).
_FALLBACK = "text"
# The field a record with no complete shape most likely lacks its partner of, so the error names it.
_PARTIAL = [("instruction", "instruction_output"), ("prompt", "prompt_completion"),
            ("completion", "prompt_completion"), ("question", "qa_splits"), ("answer", "qa_splits")]


def detect_format(rec: RawRecord, columns: dict | None = None) -> str:
    """The one shape whose fields the record has (the most specific one: Dolly's fields include
    instruction_response's). Two shapes that both fit are refused, never guessed."""
    if columns:
        return "columns"
    if not isinstance(rec.record, dict):
        raise rec.error(f"expected a JSON object (a record with fields), got {type(rec.record).__name__}")
    r = rec.record
    lower = {k.lower() for k in r}
    found = [s for s in SHAPES.values() if s.matches(r, lower)]
    found = [s for s in found if not any(set(s.fields) < set(o.fields) for o in found)]
    if len(found) > 1:
        found = [s for s in found if s.name != _FALLBACK]
    if len(found) == 1:
        return found[0].name
    if found:
        names = ", ".join(s.name for s in found)
        raise rec.error(f"the fields {', '.join(sorted(r))} fit several formats ({names}): choose one with "
                        "--format (data.format), or map the fields with data.columns")
    partial = next((fmt for key, fmt in _PARTIAL if key in lower), None)
    if partial:
        return "socratic" if partial == "instruction_output" and isinstance(r.get("output"), list) else partial
    fields = ", ".join(sorted(r)) or "(none)"
    raise rec.error(f"the fields {fields} match no known format (map them with data.columns). "
                    f"Known formats: {'; '.join(FORMATS.values())}")


def convert(rec: RawRecord, fmt: str, columns: dict | None = None) -> Converted:
    """One record as {"messages": [...]} or {"text": ...}, with the fields it used; the record's other
    fields go to example["metadata"] (with the line or record number), so nothing is lost."""
    if not isinstance(rec.record, dict):
        raise rec.error(f"expected a JSON object (a record with fields), got {type(rec.record).__name__}")
    if fmt == "columns":
        if not columns:
            raise SFTError("data.format=columns needs data.columns (the mapping of your fields to roles)")
        out = from_columns(rec, columns)
    elif fmt in SHAPES:
        out = SHAPES[fmt].convert(rec, columns or {})
    else:
        raise SFTError(f"unknown format '{fmt}' (formats: {', '.join(FORMATS)})")
    meta = {k: v for k, v in rec.record.items() if k not in out.used or out.used[k] == _REJECTED}
    out.example["metadata"] = _jsonable({**meta, **rec.where})
    return out


def known_metadata(fmt: str) -> frozenset:
    shape = SHAPES.get(fmt)
    return METADATA | (shape.metadata if shape else frozenset())


def _jsonable(x):
    """Metadata as plain JSON (parquet/arrow rows may hold numpy or datetime values)."""
    try:
        json.dumps(x, ensure_ascii=False)
        return x
    except TypeError:
        return json.loads(json.dumps(x, ensure_ascii=False, default=str))
