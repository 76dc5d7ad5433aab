"""Conversations to token ids with assistant-only labels, for any chat template.

    from lib.tokenization import encode_example
    enc = encode_example(tokenizer, {"messages": [...]}, max_length=1024)
    enc["input_ids"], enc["labels"]          # labels are -100 outside assistant answers

The conversation is rendered once with the tokenizer's own chat template. Each assistant
message's content is located in the rendered text (the template's generation prompt tells where
it starts), extended by the end-of-turn token the template puts right after it, and every token
overlapping those character spans is trained. This needs no `{% generation %}` markers, so it
works for ChatML, Llama-3, Gemma, Mistral and the tiny model's template alike, and the same
labels serve training, the data audit, perplexity and the merge check.

Plain-text examples ({"text": ...}) are language-modelling data: <bos> text <eos>, every token
trained.
"""

from __future__ import annotations

IGNORE_INDEX = -100
_PROBE = "PROBE_ANSWER_7f3a"


class TemplateError(ValueError):
    """The chat template does not render an assistant message's content verbatim."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template writes right after an assistant answer (e.g. <|im_end|>).

    None when the template puts no special token there; then `eos_token` is the stop signal.
    """
    if not has_chat_template(tokenizer):
        return tokenizer.eos_token
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = _render(tokenizer, messages)
    except Exception:
        return None
    after = text[text.find(_PROBE) + len(_PROBE):] if _PROBE in text else ""
    for s in _special_strings(tokenizer):
        if after.startswith(s):
            return s
    return None


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the end-of-turn token and eos, without duplicates."""
    ids = []
    for tok in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int, bool]]]:
    """Render `messages`; return the text and, per assistant message, (start, end, has_eot).

    [start, end) covers the content and, when the template writes one right after it, the
    end-of-turn token.
    """
    text = _render(tokenizer, messages)
    eot = end_of_turn_token(tokenizer)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        start = -1
        try:
            prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        except Exception:
            prefix = None
        if prefix is not None and len(prefix) >= cursor and text.startswith(prefix) \
                and text.startswith(content, len(prefix)):
            start = len(prefix)
        if start < 0:
            start = text.find(content, cursor)
        if start < 0 and content.strip():
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise TemplateError(
                f"the chat template does not render assistant message {i + 1} verbatim, so its "
                "tokens cannot be located for the loss"
            )
        end = start + len(content)
        has_eot = eot is not None and text.startswith(eot, end)
        if has_eot:
            end += len(eot)
        spans.append((start, end, has_eot))
        cursor = end
    return text, spans


def encode_example(tokenizer, example: dict, max_length: int | None = None) -> dict:
    """Token ids and labels of one normalised example ({"messages": [...]} or {"text": ...}).

    Returns input_ids, labels, and for the audit: length (before truncation), n_answers,
    n_cut (answers max_length cuts), n_eot (answers ending with the end-of-turn token),
    n_trained (trained tokens after truncation).
    """
    if "messages" in example and example["messages"] is not None:
        text, spans = assistant_spans(tokenizer, example["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        span_i = 0
        for t, (s, e) in enumerate(offsets):
            while span_i < len(spans) and spans[span_i][1] <= s:
                span_i += 1
            if span_i < len(spans) and e > spans[span_i][0] and s < spans[span_i][1] and e > s:
                labels[t] = ids[t]
        n_eot = sum(1 for sp in spans if sp[2])
        # Token index where each answer ends, to count the answers truncation would cut.
        answer_last_token = []
        for s0, e0, _ in spans:
            last = max((t for t, (s, e) in enumerate(offsets) if e > s0 and s < e0), default=-1)
            answer_last_token.append(last)
        n_answers = len(spans)
    else:
        text = example["text"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + body
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
        if tokenizer.bos_token_id is not None:
            labels[0] = IGNORE_INDEX
        n_answers, n_eot, answer_last_token = 1, int(tokenizer.eos_token_id is not None), [len(ids) - 1]
    length = len(ids)
    n_cut = 0
    if max_length is not None and length > max_length:
        n_cut = sum(1 for last in answer_last_token if last >= max_length)
        ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "length": length,
        "n_answers": n_answers,
        "n_cut": n_cut,
        "n_eot": n_eot,
        "n_trained": sum(1 for x in labels if x != IGNORE_INDEX),
    }


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str | None]:
    """Split a conversation for generation: everything before the last assistant turn, and that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), messages[last]["content"]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model continues to answer `messages` (the generation prompt appended)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template a simple one that ends each turn with eos.

    Returns True when a template was added (it is saved with the adapter, so chat and merge
    render conversations exactly as training did).
    """
    if has_chat_template(tokenizer):
        return False
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a chat template nor an eos token")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True
