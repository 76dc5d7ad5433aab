"""Record shapes: which shape a record has, the conversation it holds, and where each field went.

    from lib.data.formats import detect_format, convert
    fmt = detect_format(raw)                  # 'dolly', 'sharegpt', ...; 'columns' when data.columns is set
    c = convert(raw, fmt, columns=None)       # c.example: {"messages": [...], "metadata": {...}}; c.used

A shape names the fields it uses (and what for) and the fields it knows to be metadata. Any other
field is handed to `FieldAccount` (lib/data/fields.py), which counts it over the whole file so that
prepare can refuse a text field nothing uses instead of training without it. Every built-in shape
is a column mapping (the roles of `data.columns`: prompt, input, response, system, history,
messages, role, content, weight, text, and the role values user_tag, assistant_tag, system_tag)
or a small converter of its own (Socratic question lists, Capybara pairs, preference data).

How each turn is read (roles, weights, tool calls and results, reasoning) is lib/data/turns.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lib.data.readers import RawRecord
from lib.data.toolsets import from_glaive, from_xlam
from lib.data.turns import (
    SHAREGPT_ROLES,
    Converted,
    read_pairs,
    read_turns,
    string_field,
    tools_list,
    type_name,
)
from lib.run.errors import SFTError
from lib.run.settings import COLUMN_ROLES

# Fields any shape treats as metadata: identifiers, provenance, labels. Kept in each example's
# "metadata" (data/train.jsonl), never given to the model.
METADATA = frozenset({
    "id", "_id", "idx", "index", "uid", "uuid", "instance_id", "prompt_id", "conversation_id", "conv_id",
    "example_id", "task_id", "source", "sources", "dataset", "data_source", "origin", "category", "categories",
    "task", "task_type", "type", "subset", "split", "lang", "language", "license", "url", "hash", "timestamp",
    "created_at", "model", "model_name", "models", "tags", "label", "labels", "score", "scores", "quality",
    "domain", "topic", "difficulty", "level", "turn", "turns", "num_turns", "length",
    "subcategory", "problem_type", "question_type", "finish_reasons",  # Hermes function-calling, OpenR1-Math
})

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
        return read_turns(rec, value, key, out, cols.get("role", "role"), cols.get("content", "content"),
                      cols.get("weight", "weight"), _role_map(cols))
    text = string_field(rec, key, what="answer" if role == "assistant" else "field")
    return [{"role": role, "content": text}]


def from_columns(rec: RawRecord, cols: dict) -> Converted:
    """A record read through a column mapping (role -> field; see COLUMN_ROLES)."""
    r, out = rec.record, Converted({})
    if "text" in cols:
        out.example = {"text": string_field(rec, cols["text"])}
        out.used[cols["text"]] = COLUMN_ROLES["text"]
        return out
    messages = []
    system = string_field(rec, cols["system"], required=False) if "system" in cols else None
    if system is not None:
        out.used[cols["system"]] = COLUMN_ROLES["system"]
        if system.strip():
            messages.append({"role": "system", "content": system})
    if "messages" in cols:
        key = cols["messages"]
        if key not in r:
            raise rec.error("missing field", field=key)
        turns = read_turns(rec, r[key], key, out, cols.get("role", "role"), cols.get("content", "content"),
                       cols.get("weight", "weight"), _role_map(cols))
        if messages and turns[0]["role"] == "system":
            raise rec.error(f"two system messages: one in '{cols['system']}' and one opening the conversation",
                            field=key)
        messages += drop_leading_answers(turns, out)
        out.used[key] = COLUMN_ROLES["messages"]
    else:
        if r.get(cols.get("history")) is not None:
            messages += read_pairs(rec, r[cols["history"]], cols["history"], "0", "1")
            out.used[cols["history"]] = COLUMN_ROLES["history"]
        prompt = _side(rec, cols["prompt"], out, cols, "user")
        out.used[cols["prompt"]] = COLUMN_ROLES["prompt"]
        inp = string_field(rec, cols["input"], required=False) if "input" in cols else None
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


def drop_leading_answers(turns: list[dict], out: Converted) -> list[dict]:
    """The turns without the assistant turns that open the conversation before any user turn (a greeting
    nothing prompts; FastChat drops it too), counted in `out.dropped_turns` for the audit. A conversation
    with no user turn after them is left as it is."""
    i = 0
    while i < len(turns) and turns[i]["role"] == "system":
        i += 1
    j = i
    while j < len(turns) and turns[j]["role"] == "assistant" and not turns[j].get("tool_calls"):
        j += 1
    if j == i or not any(t["role"] == "user" for t in turns[j:]):
        return turns
    out.dropped_turns += j - i
    return turns[:i] + turns[j:]


def _reasoning_set(rec: RawRecord, cols: dict) -> Converted:
    """s1K: question, thinking_trajectories (the reasoning: a list of strings, or one), attempt (the answer)."""
    question = string_field(rec, "question")
    attempt = string_field(rec, "attempt", what="answer")
    thinking = rec.record.get("thinking_trajectories")
    parts = [thinking] if isinstance(thinking, str) else thinking
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise rec.error(f"expected the reasoning as a list of strings, got {type_name(thinking)}",
                        field="thinking_trajectories")
    answer = {"role": "assistant", "content": attempt}
    if any(p.strip() for p in parts):
        answer["reasoning_content"] = "\n".join(parts)
    used = {"question": "user turn", "thinking_trajectories": "the answer's reasoning (trained, before it)",
            "attempt": "assistant answer (trained)"}
    return Converted({"messages": [{"role": "user", "content": question}, answer]}, used)


# HelpSteer2's multi-turn prompts: "turn 1<extra_id_1>Assistant\nanswer 1<extra_id_1>User\nturn 2"
_EXTRA_ID = re.compile(r"<extra_id_1>(User|Assistant)\n?")


def _prompt_response(rec: RawRecord, cols: dict) -> Converted:
    """prompt + response (HelpSteer / HelpSteer2; the scores are metadata). A multi-turn prompt is split into
    its turns; its earlier answers are context (weight 0): the data scores, and trains, the response."""
    prompt = string_field(rec, "prompt")
    out = from_columns(rec, {"prompt": "prompt", "response": "response", "system": "system"})
    if "<extra_id_1>" not in prompt:
        return out
    pieces = _EXTRA_ID.split(prompt)
    turns = [{"role": "user", "content": pieces[0].strip()}]
    for speaker, text in zip(pieces[1::2], pieces[2::2]):
        turn = {"role": "user" if speaker == "User" else "assistant", "content": text.strip()}
        turns.append(dict(turn, weight=0) if speaker == "Assistant" else turn)
    head = [m for m in out.example["messages"] if m["role"] == "system"]
    out.example["messages"] = head + turns + [out.example["messages"][-1]]
    out.used["prompt"] = "the turns before the answer: User = user, Assistant = earlier answer (context, not trained)"
    return out


def _socratic(rec: RawRecord, cols: dict) -> Converted:
    r = rec.record
    instruction = string_field(rec, "instruction")
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
    messages = read_pairs(rec, rec.record["conversation"], "conversation", "input", "output")
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
        answer = read_turns(rec, chosen, "chosen", out, *how)
    else:
        answer = [{"role": "assistant", "content": string_field(rec, "chosen", what="answer")}]
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
            messages = read_turns(rec, value, prompt_key, out, *how) + answer
        else:
            text = string_field(rec, prompt_key)
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


# HelpSteer / HelpSteer2's five human scores of the response (0 to 4), and LLaMA-Factory v1's record extras.
_SCORES = frozenset({"helpfulness", "correctness", "coherence", "complexity", "verbosity"})
_LLAMAFACTORY_V1 = frozenset({"extra_info", "_dataset_name"})
_ALPACA = {"prompt": "instruction", "input": "input", "system": "system", "history": "history"}
SHAPES = {s.name: s for s in [
    Shape("messages", "messages (a list of {role, content}; UltraChat, no_robots, OpenAI chat, LLaMA-Factory v1 "
          "content parts with loss_weight)", ("messages",), _mapped({"messages": "messages", "tools": "tools"}),
          metadata=_LLAMAFACTORY_V1),
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
    Shape("prompt_response", "prompt_response (prompt + response; HelpSteer2, its scores kept as metadata)",
          ("prompt", "response"), _prompt_response, metadata=_SCORES),
    Shape("reasoning", "reasoning (question + thinking_trajectories + attempt; s1K)",
          ("question", "thinking_trajectories", "attempt"), _reasoning_set,
          metadata=frozenset({"solution", "cot_type", "source_type", "metadata", "cot"})),
    Shape("glaive", "glaive (system with the function schemas + one chat string with USER:, ASSISTANT:, "
          "<functioncall>, FUNCTION RESPONSE:; glaive-function-calling-v2)", ("chat",), from_glaive,
          when=lambda r: isinstance(r.get("chat"), str) and "USER:" in r["chat"]),
    Shape("xlam", "xlam (query + tools + answers as JSON strings; xlam-function-calling-60k, parallel calls)",
          ("query", "tools", "answers"), from_xlam),
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
    partial = next(((key, fmt) for key, fmt in _PARTIAL if key in lower), None)
    if partial and not _other_text_fields(r, partial[1]):  # the shape's field whose partner is missing
        fmt = partial[1]
        return "socratic" if fmt == "instruction_output" and isinstance(r.get("output"), list) else fmt
    raise rec.error(_no_format(r, partial))


def _other_text_fields(record: dict, fmt: str) -> list[str]:
    """The fields holding text that neither the shape `fmt` names nor knows as metadata."""
    own = {f.lower() for f in SHAPES[fmt].fields} | {"input", "system", "history"}
    return [k for k, v in record.items() if k.lower() not in own and k not in known_metadata(fmt)
            and (isinstance(v, str) and v.strip() or isinstance(v, (list, dict)) and v)]


def _no_format(record: dict, partial: tuple | None) -> str:
    """Why no shape fits, in one line: the fields, what is missing, and the three ways on."""
    fields = ", ".join(sorted(record)) or "(none)"
    texts = [k for k, v in record.items() if isinstance(v, str) and v.strip() and k not in METADATA]
    example = f"{{prompt: {texts[0]}, response: {texts[-1]}}}" if len(texts) > 1 else "{prompt: ..., response: ...}"
    hint = ""
    if partial:
        key, fmt = partial
        missing = [f for f in SHAPES[fmt].fields if f not in {k.lower() for k in record}]
        hint = (f" ('{key}' is a field of the {fmt} format, but its '{missing[0]}' is missing and the fields "
                f"{', '.join(_other_text_fields(record, fmt))} are not that format's)") if missing else ""
    return (f"the fields {fields} match no known format{hint}: map them to roles with data.columns (e.g. "
            f"data.columns={example}), name a format with --format (data.format: {', '.join(SHAPES)}), and list "
            "fields to leave out in data.ignore_fields")


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
