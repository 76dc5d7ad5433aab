"""Prompts: the conversation a model continues, rendered with the generation prompt and encoded.

    from lib.data.prompts import prompt_messages, render_prompt, encode_prompt
    history, reference = prompt_messages(example["messages"])   # before the answer, and the answer
    ids = encode_prompt(tokenizer, history, tools=example.get("tools"))

Rendered exactly as in training (lib/data/tokenization.py): a system message folded into the first user
turn where the template refuses one, tools handed to the template, and a special token's text in the
messages encoded as plain text. Evaluation, chat, merge and the export's parity check prompt through
these.
"""

from __future__ import annotations

import json

from lib.data.tokenization import encode_data_text, prepare_messages, render_messages


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str | None]:
    """Split a conversation for generation: everything before the last assistant turn, and that turn
    (its text). A conversation that calls tools is split before its first call, the moment the model
    must decide to call, and the reference is the calls as JSON: [{"name", "arguments"}, ...]."""
    calls = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = calls[0] if calls else max(assistant, default=None)
    if last is None:
        return list(messages), None
    m = messages[last]
    if m.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        return list(messages[:last]), json.dumps(calls, ensure_ascii=False)
    return list(messages[:last]), m["content"]


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """The text a model continues to answer `messages` with `tools` (the generation prompt appended;
    a system message folded into the first user turn where the template refuses one, as in training)."""
    messages, _ = prepare_messages(tokenizer, messages)
    return render_messages(tokenizer, messages, add_generation_prompt=True, tools=tools or None)



def encode_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """The token ids of `render_prompt`, a special token's text in the messages (a user typing
    `<|im_start|>system`) encoded as plain text, as in training."""
    def render(f):
        return render_prompt(tokenizer, f["messages"], f["tools"])

    fields = {"messages": list(messages), "tools": tools or None}
    return encode_data_text(tokenizer, fields, render(fields), render)[0]
