"""Reasoning and thinking templates: reasoning given in a separate field (`reasoning_content`) is left to the
chat template where it renders it, else written inline before the answer as `<think>...</think>` (opened once:
`one_think_opener`), else refused in one line; a turn is placed after a thinking prompt (`parted_prompt`)."""

from __future__ import annotations

import re

from lib.data.templates import TemplateError, has_chat_template, model_name, template_info


def no_reasoning_place(tokenizer) -> str:
    return (f"the chat template of {model_name(tokenizer)} has no place for reasoning given in a separate field "
            "(reasoning_content, thinking, reasoning) and the tokenizer has no <think> tokens: set "
            "data.inline_reasoning=true to train it before the answer as <think>...</think>, or remove the "
            "field to train the answers without it")


def knows_think_tokens(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in ("<think>", "</think>"))


def resolve_reasoning(tokenizer, example: dict, inline: bool = False) -> dict:
    """`example` with each reasoning field as the template takes it: left to the template where it
    renders reasoning; else written inline before the answer as `<think>\n...\n</think>\n\n` when
    `inline` (data.inline_reasoning) or the tokenizer has <think> tokens; else a one-line TemplateError."""
    messages = example.get("messages")
    if not messages or not any(m.get("reasoning_content") is not None for m in messages):
        return example
    if has_chat_template(tokenizer) and template_info(tokenizer).reasoning_key is not None:
        return example
    if not (inline or knows_think_tokens(tokenizer)):
        raise TemplateError(no_reasoning_place(tokenizer))
    out = []
    for m in messages:
        if m.get("reasoning_content") is not None:
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{messages[len(out)]['reasoning_content'].strip()}\n</think>\n\n{m['content']}"
        out.append(m)
    return dict(example, messages=out)


_EMPTY_BEFORE_OPENER = re.compile(r"<think>\s*</think>\s*(?=<think>)")
_OPENER_AFTER_OPENER = re.compile(r"(<think>\s*)<think>\n?")


def one_think_opener(text: str) -> str:
    """A rendering with inline reasoning written once: an empty `<think></think>` the template writes before an
    inline block (Kimi-K2-Thinking's history form) is dropped, and so is an inline `<think>` right after the
    one the template or its generation prompt opened (Nemotron-Nano-v2's `<think>\n\n`)."""
    if text.count("<think>") < 2:
        return text
    return _OPENER_AFTER_OPENER.sub(r"\1", _EMPTY_BEFORE_OPENER.sub("", text))


def _shared(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parted_prompt(prompt: str, rendered: str, history: str, marked: str, earlier: list) -> str:
    """The generation prompt an assistant turn is placed after: the prompt itself where the rendering continues
    it; else, where a thinking template's prompt opens the reasoning with something its rendered turns do not
    have (QwQ, Nemotron-Nano-v2, MiniMax-M2: `<think>\n`; Gemma 4: `<|channel>thought\n<channel|>`; Apriel 1.6:
    `Here are my reasoning steps:\n`), the part of the prompt the rendering shares, so the turn is labelled from
    where they part, and never after where the turn's own text begins (`marked`: the conversation rendered with
    the turn replaced by a one-character answer), so no text of the turn that happens to match the prompt is
    left untrained. That part must hold the whole history: past `history` (the messages before the turn,
    rendered without a prompt) where the template writes the prompt only when asked (Apriel 1.6 always writes
    it), and no text of the `earlier` messages in the part left out; else the prompt itself, which the caller
    refuses or places otherwise (gpt-oss rewrites its history)."""
    if rendered.startswith(prompt):
        return prompt
    n = min(_shared(prompt, rendered), _shared(marked, rendered))
    left_out = prompt[n:]
    if (prompt.startswith(history) and len(history) < len(prompt) and n <= len(history)) or any(
            isinstance(m.get("content"), str) and m["content"].strip() and m["content"].strip() in left_out
            for m in earlier):
        return prompt
    return prompt[:n]
