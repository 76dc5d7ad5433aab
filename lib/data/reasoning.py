"""Reasoning and thinking templates: reasoning given in a separate field (`reasoning_content`) is left to the
chat template where it renders it, else written inline before the answer as `<think>...</think>` (opened once:
`one_think_opener`), else refused in one line; a call is placed after a thinking prompt (`call_prompt`)."""

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


def call_prompt(prompt: str, rendered: str) -> str:
    """The generation prompt a call is placed after: the prompt itself, or, where a thinking template's prompt
    opens a reasoning block that its rendered call does not have (QwQ, Nemotron-Nano-v2: `<think>\n`), the
    prompt without that opener, so the call is labelled from where the rendering and the prompt part."""
    if rendered.startswith(prompt):
        return prompt
    cut = prompt.rstrip()
    for opener in ("<think></think>", "<think>"):
        if cut.endswith(opener) and rendered.startswith(cut[: -len(opener)]):
            return cut[: -len(opener)]
    return prompt
