"""Conversations to token ids with assistant-only labels, placed by position on any chat template.

    from lib.data.tokenization import encode_example
    enc = encode_example(tokenizer, {"messages": [...]}, max_length=1024)
    enc["input_ids"], enc["labels"]          # labels are -100 outside assistant answers

How an answer is placed (no `{% generation %}` markers needed, and never by searching for the
answer's text, so a short answer such as "4" cannot be matched inside the question):

* For assistant message i the template renders the conversation twice: up to message i-1 with the
  generation prompt (what the model sees at inference), and up to message i. When the first is a
  prefix of the second, everything the template writes after the generation prompt is the reply
  the model must produce (Qwen3's `<think>\n\n</think>\n\n`, gpt-oss's
  `<|channel|>final<|message|>`, Llama-2's leading space). Where the generation prompt is not a
  prefix (DeepSeek-R1's `<think>\n`), the answer starts where its content starts.
* Content edges are found with a sentinel: the answer is rendered with a unique marker glued to
  its end (or start), and the rendering with the marker removed must equal the real rendering
  character for character; templates that trim content are covered by trying the trimmed answer.
  A template that drops or rewrites part of an answer (DeepSeek-R1 drops `<think>` blocks) gets a
  one-line `TemplateError`, never a guess.
* The stop token is the special token the template writes right after the answer (whitespace may
  come first: Llama-2's `' ' + eos`, deepseek-coder's `\n<|EOT|>`), per turn, so gpt-oss trains
  `<|return|>` on its final answer. Where a template leaves it off the final answer (Qwen1.5), the
  end-of-turn token it writes after earlier answers is appended, since that is what the model
  must emit to stop. Special tokens glued to the stop that open no turn are part of it (Command A's
  `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, trained whole); a turn opener is never a stop (Baichuan 2's
  `<reserved_106>`). Where a template writes nothing at all after an answer (Baichuan 2, ChatGLM2),
  the tokenizer's eos, which those models' generation stops on, is appended (`eos_stop`), one
  assistant turn per example; a text stop (RWKV World's `\n\n`) is no token generation can stop
  on, so prepare refuses it in one line (data.allow_missing_stop accepts it). The stop tokens are
  learnt from a multi-turn probe rendering (like TRL's
  `is_chat_template_stop_token_trained`) and all of them are in `stop_token_ids`.
* A template that renders an answer differently once later turns follow (reasoning templates
  that drop earlier `<think>` blocks, Qwen3, gpt-oss) cannot train a whole conversation in one
  sequence: `split_for_template` turns it into one example per assistant turn, each rendered as
  at inference, earlier answers kept as context with `"weight": 0` (the OpenAI fine-tuning field).
* A template that refuses a system message (Gemma, Mistral) gets it folded into the first user
  turn (`system_folded` in the result, counted by the audit).
* Tool calling (an example's `tools`, assistant messages with `tool_calls`, `tool` results) is
  rendered with `tools=` by the template. An assistant turn that calls tools is placed by position
  as well: everything the template writes after the generation prompt, up to and including the
  special token that ends the turn (`<|im_end|>`, `<|eot_id|>`, gpt-oss's `<|call|>`), is what the
  model produced; the call's name and argument names must be in that span, else a one-line
  TemplateError. How the template wants a call (arguments as an object or a JSON string, content
  "" or null) is probed once (`template_info`); a template that renders no tool schemas or no
  tool calls refuses such examples in one line naming the model.
* Reasoning in a separate field (a message's `reasoning_content`) is handed to the template under
  the key it reads (`reasoning_content` for Qwen3, `thinking` for gpt-oss; probed), and trained
  where the template renders it; `resolve_reasoning` writes it inline as `<think>...</think>` where
  the template has no place for it (only when the tokenizer has those tokens or it is asked to),
  or refuses in one line.

The same labels serve training, the data audit, perplexity and the merge check. Plain-text
examples ({"text": ...}) are language-modelling data: <bos> text <eos>, every token trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lib.data.reasoning import no_reasoning_place, one_think_opener, parted_prompt, resolve_reasoning
from lib.data.templates import (
    MASK,
    TemplateError,
    TemplateInfo,
    apply_template,
    eos_stop,
    has_chat_template,
    mask_specials,
    model_name,
    special_strings,
    specials_as_text,
    stop_run,
    template_info,
    trailing_special,
)

IGNORE_INDEX = -100
_SENTINEL = "QzSENTINELqZ"  # no whitespace, nothing a template would trim or split on
_FOLD_SEPARATOR = "\n\n"


class HistoryRewriteError(TemplateError):
    """The template renders an earlier answer differently once later turns follow."""


def _for_template(tokenizer, m: dict) -> dict:
    """A message as this template wants it: no weight; reasoning under the key the template reads;
    tool calls with arguments as an object or a JSON string and content "" or null, as it renders them."""
    out = {k: v for k, v in m.items() if k != "weight"}
    if out.get("reasoning_content") is not None or out.get("tool_calls"):
        info = template_info(tokenizer)
        if out.get("reasoning_content") is not None:
            if info.reasoning_key is None:
                raise TemplateError(no_reasoning_place(tokenizer))
            out[info.reasoning_key] = out.pop("reasoning_content")
        if out.get("tool_calls"):
            if info.call_form is None:
                raise TemplateError(f"the chat template of {model_name(tokenizer)} does not render tool calls (it has no "
                                    "tool-call handling), so this example cannot be trained as the model sees it: "
                                    "choose a model or data.prompt_format whose template renders tool_calls")
            args_as_string, content_none = info.call_form
            if args_as_string:
                out["tool_calls"] = [dict(c, function=dict(c["function"], arguments=json.dumps(
                    c["function"]["arguments"], ensure_ascii=False))) for c in out["tool_calls"]]
            if content_none and not out.get("content"):
                out["content"] = None
    return out


def render_messages(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    if tools and not template_info(tokenizer).renders_tools:
        raise TemplateError(f"the chat template of {model_name(tokenizer)} does not render tools (it has no tools "
                            "handling), so the model would never see the tool schemas: choose a model or "
                            "data.prompt_format whose template renders tools, or remove the record's tools")
    msgs = [_for_template(tokenizer, m) for m in messages]
    return one_think_opener(apply_template(tokenizer, msgs, add_generation_prompt, tools))


def prepare_messages(tokenizer, messages: list[dict]) -> tuple[list[dict], bool]:
    """The messages the template is given: a system message folded into the first user turn when
    the template refuses system messages. Returns (messages, folded)."""
    messages = list(messages)
    if not any(m["role"] == "system" for m in messages) or not has_chat_template(tokenizer):
        return messages, False
    if template_info(tokenizer).system_ok:
        return messages, False
    if messages[0]["role"] != "system" or any(m["role"] == "system" for m in messages[1:]):
        raise TemplateError("the chat template accepts no system message and this one is not the first "
                            "message, so it cannot be folded into the first user turn")
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise TemplateError("the chat template accepts no system message and no user turn follows it "
                            "to fold it into")
    system, user = messages[0], messages[1]
    merged = dict(user, content=system["content"] + _FOLD_SEPARATOR + user["content"])
    return [merged] + messages[2:], True


def _edge(tokenizer, messages, i: int, rendered: str, at_end: bool, tools=None) -> int | None:
    """Character index in `rendered` (messages[:i+1] rendered) where answer i's content ends
    (at_end) or starts, found by gluing a sentinel to it; None if the template does not render
    the content verbatim (allowing trimmed whitespace)."""
    content = messages[i]["content"]
    variants = (content, content.rstrip()) if at_end else (content, content.lstrip())
    for v in dict.fromkeys(variants):
        marked = dict(messages[i], content=v + _SENTINEL if at_end else _SENTINEL + v)
        try:
            text = render_messages(tokenizer, list(messages[:i]) + [marked], tools=tools)
        except TemplateError:
            continue
        if text.count(_SENTINEL) != 1:
            continue
        pos = text.index(_SENTINEL)
        if text[:pos] + text[pos + len(_SENTINEL):] == rendered:
            return pos
        cut = len(text[:pos].rstrip())  # GLM-4.6: the newline it writes before a text only when there is one
        if not v.strip() and text[:cut] + text[pos + len(_SENTINEL):] == rendered:
            return cut
    return None


def _after_header(tokenizer, messages, i: int, rendered: str, start: int, tools=None) -> int:
    """Where answer i starts when the history rewrites earlier turns (so its generation prompt is no prefix of
    the rendering, gpt-oss after a text-plus-call turn): right after the generation prompt's own header
    (`<|start|>assistant`) when that header opens the answer's turn, so what the template writes between it
    and the text (`<|channel|>final<|message|>`) is trained as the model writes it; else at the text."""
    bare = render_messages(tokenizer, messages[:i], tools=tools)
    header = render_messages(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
    header = header[len(bare):] if header.startswith(bare) else ""
    at = rendered.rfind(header, 0, start) if header.strip() else -1
    between = rendered[at + len(header):start] if at >= 0 else ""
    if at < 0 or any((m.get("content") or "").strip() and m["content"].strip() in between for m in messages):
        return start
    return at + len(header)


def _parted(tokenizer, messages, i: int, prompt: str, rendered: str, tools) -> str:
    """The prompt assistant message i is placed after (`parted_prompt`; renders only where it is no prefix)."""
    if rendered.startswith(prompt):
        return prompt
    marked = render_messages(tokenizer, [*messages[:i], {"role": "assistant", "content": _SENTINEL}], tools=tools)
    return parted_prompt(prompt, rendered, render_messages(tokenizer, messages[:i], tools=tools), marked, messages[:i])


def _norm(text: str) -> str:
    """Text without whitespace and <think> tags, to check that a whole answer is rendered."""
    return "".join(text.replace("<think>", "").replace("</think>", "").split())


@dataclass
class _Turn:
    text: str  # messages[:i+1] rendered, with the stop token appended where the template leaves it off
    start: int  # first trained character
    end: int  # one past the last trained character (after the stop token when there is one)
    stop: str | None
    appended: bool
    call: bool = False  # the turn calls tools
    reasoning: str | None = None  # its reasoning text (a separate field, or a <think> block in its content)


def _check_no_stop_text(messages, info: TemplateInfo) -> None:
    for m in messages:
        text = "".join([m.get("content") or "", m.get("reasoning_content") or "",
                        json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else ""])
        for s in (info.stop_last, info.stop_history, info.stop_call):
            if s and s in text:
                raise TemplateError(f"a message contains the end-of-turn token {s!r} as text")


def _check_reasoning(tokenizer, m: dict, span: str, n: int) -> None:
    reasoning = m.get("reasoning_content")
    if reasoning and _norm(reasoning) not in _norm(span):
        raise TemplateError(f"assistant message {n}: the chat template of {model_name(tokenizer)} does not render its "
                            "reasoning within the answer, so it cannot be trained where the model writes it")


def _place_call(tokenizer, messages, i: int, info: TemplateInfo, specials, n: int, tools) -> _Turn:
    """Assistant message i, which calls tools, rendered as the last message and placed: what the
    template writes after the generation prompt, up to and including the token that ends the turn."""
    m = messages[i]
    rendered = render_messages(tokenizer, messages[: i + 1], tools=tools)
    prompt = render_messages(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
    prompt = _parted(tokenizer, messages, i, prompt, rendered, tools)
    if not rendered.startswith(prompt):
        raise TemplateError(f"assistant message {n}: the chat template of {model_name(tokenizer)} renders the tool "
                            "call after something other than its generation prompt, so it cannot be placed as the "
                            "model produces it")
    start = len(prompt)
    reply = rendered[start:]
    if info.trailing_prompt and reply.rstrip().endswith(info.trailing_prompt.rstrip()):
        reply = reply.rstrip()[: -len(info.trailing_prompt.rstrip())]  # Command R7B / A: the next prompt, always written
    reply = reply.rstrip()
    end = start + len(reply)
    stop = trailing_special(reply, specials)
    stop = None if stop in info.openers else stop
    span = rendered[start:end]
    eos = tokenizer.eos_token
    first_call = min((span.find(c["function"]["name"]) for c in m["tool_calls"] if c["function"]["name"] in span),
                     default=-1)
    if eos and eos in span[:max(first_call, 0)] and eos != info.trailing_prompt:
        raise TemplateError(f"assistant message {n}: the chat template of {model_name(tokenizer)} ends the turn with "
                            f"{eos!r} before its tool call (it renders the text beside the call as a turn of its own), "
                            "so the model would learn to stop before calling: drop the text beside the call or choose "
                            "another data.prompt_format")
    for call in m["tool_calls"]:
        fn = call["function"]
        missing = [x for x in [fn["name"], *fn["arguments"]] if x not in span]
        if missing:
            raise TemplateError(f"assistant message {n}: the chat template of {model_name(tokenizer)} does not render "
                                f"its call of {fn['name']} whole ({missing[0]!r} is missing), so it cannot be trained")
    if m.get("content") and _norm(m["content"]) not in _norm(span):
        raise TemplateError(f"assistant message {n}: the chat template of {model_name(tokenizer)} drops the text "
                            "beside its tool call, so it cannot be trained as written")
    _check_reasoning(tokenizer, m, span, n)
    eos = eos_stop(tokenizer, info)
    if stop is None and not rendered[end:].strip() and eos:  # nothing ends a last turn (Apriel 1.6): stops on eos
        return _Turn(rendered[:end] + eos, start, end + len(eos), eos, True)
    return _Turn(rendered, start, end, stop, False)


def _place_turn(tokenizer, messages, i: int, info: TemplateInfo, specials, n: int, tools=None) -> _Turn:
    """Assistant message i (message number n of the data) rendered as the last message, placed."""
    _check_no_stop_text(messages, info)
    if messages[i].get("tool_calls"):
        return _place_call(tokenizer, messages, i, info, specials, n, tools)
    content = messages[i]["content"]
    rendered = render_messages(tokenizer, messages[: i + 1], tools=tools)
    prompt = render_messages(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
    end = _edge(tokenizer, messages, i, rendered, at_end=True, tools=tools)
    if end is None:
        why = ("it drops or rewrites its <think> block" if "</think>" in content
               else "it changes the text of the answer")
        raise TemplateError(f"assistant message {n}: the chat template does not render it verbatim ({why}), "
                            "so its tokens cannot be placed exactly")
    parted = _parted(tokenizer, messages, i, prompt, rendered, tools)
    if rendered.startswith(parted) and len(parted) <= end:
        start = len(parted)
    else:
        start = _edge(tokenizer, messages, i, rendered, at_end=False, tools=tools)
        if start is None or start > end:
            why = ("it drops or rewrites its <think> block" if "</think>" in content
                   else "its generation prompt is not a prefix of the rendered conversation")
            raise TemplateError(f"assistant message {n}: the start of the answer cannot be placed exactly ({why})")
        start = _after_header(tokenizer, messages, i, rendered, start, tools)
    if _norm(rendered[start:end]).endswith(_norm(content)) is False:
        raise TemplateError(f"assistant message {n}: the chat template does not render all of it (it drops "
                            f"{'its <think> block' if '</think>' in content else 'part of it'}), so it cannot be trained as written")
    _check_reasoning(tokenizer, messages[i], rendered[start:end], n)
    rest = rendered[end:]
    gap, stop = stop_run(rest, specials, info.openers)
    if stop:
        return _Turn(rendered, start, end + gap + len(stop), stop, False)
    if not rest.strip() and info.stop_history:  # the template leaves it off the final answer (Qwen1.5)
        return _Turn(rendered[:end] + info.stop_history, start, end + len(info.stop_history), info.stop_history, True)
    eos = eos_stop(tokenizer, info)
    if not rest and eos:  # no stop written at all (Baichuan 2, ChatGLM2): the model stops on eos
        return _Turn(rendered + eos, start, end + len(eos), eos, True)
    return _Turn(rendered, start, end, None, False)


def _plan(tokenizer, example: dict) -> tuple[str, list[_Turn], bool]:
    """The text of one training sequence and its trained turns; raises HistoryRewriteError when
    the conversation must be split one assistant turn per example."""
    messages, folded = prepare_messages(tokenizer, example["messages"])
    tools = example.get("tools") or None
    info = template_info(tokenizer)
    specials = special_strings(tokenizer)
    text = render_messages(tokenizer, messages, tools=tools)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    turns = []
    for i in trained:
        turn = _place_turn(tokenizer, messages, i, info, specials, n=i + 1 + folded, tools=tools)
        if i == len(messages) - 1:
            text = turn.text  # the same rendering, plus an appended stop token if the template leaves it off
        else:
            turn.appended = False  # the template writes it after this answer once more turns follow
        if text[: turn.end] != turn.text[: turn.end]:
            raise HistoryRewriteError(
                f"assistant message {i + 1 + folded}: the chat template renders it differently once later turns "
                "follow (it rewrites the history, e.g. drops reasoning or changes the end-of-turn token); "
                "train it one assistant turn per example (split_for_template; notebook 01 does this)")
        m = messages[i]
        turn.call = bool(m.get("tool_calls"))
        think = (m.get("content") or "").partition("</think>")
        turn.reasoning = m.get("reasoning_content") or (think[0].replace("<think>", "").strip() if think[1] else None)
        turns.append(turn)
    return text, turns, folded


def split_for_template(tokenizer, example: dict, inline_reasoning: bool = False) -> list[dict]:
    """`example` as the training sequences the template allows: itself, or, when the template
    rewrites earlier turns, one example per assistant turn (earlier answers kept as context with
    "weight": 0), each rendered exactly as at inference. Reasoning in a separate field is first
    resolved (`resolve_reasoning`)."""
    if example.get("messages") is None or not has_chat_template(tokenizer):
        return [example]
    example = resolve_reasoning(tokenizer, example, inline_reasoning)
    try:
        _plan(tokenizer, example)
        return [example]
    except HistoryRewriteError:
        pass
    messages = example["messages"]
    out = []
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    for k, i in enumerate(answers, start=1):
        part = [dict(m, weight=0) if m["role"] == "assistant" and j < i else m for j, m in enumerate(messages[: i + 1])]
        meta = dict(example.get("metadata", {}), turn=k, turns=len(answers))
        out.append(dict(example, messages=part, metadata=meta))
    return out


def encode_data_text(tokenizer, fields: dict, text: str, render) -> tuple[list, list, int]:
    """Token ids and character offsets of `text`, the rendering of `fields` (messages, tools), with
    the control tokens the data wrote (not the template) encoded as plain text: `render` renders the
    fields with those masked, which shows where they are (`lib.data.templates.specials_as_text`)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = special_strings(tokenizer)
    masked_fields = mask_specials(fields, specials)
    if masked_fields == fields:
        return ids, offsets, 0
    masked = render(masked_fields)
    if len(masked) != len(text) or any(a != b and b != MASK for a, b in zip(text, masked)):
        sp = next(sp for sp in specials if mask_specials(fields, [sp]) != fields)
        raise TemplateError(f"a message contains the control token {sp!r} as text, and the chat template "
                            "changes the text around it, so it cannot be encoded as plain text")
    return specials_as_text(tokenizer, text, masked, ids, offsets)


def encode_example(tokenizer, example: dict, max_length: int | None = None) -> dict:
    """Token ids and labels of one normalised example ({"messages": [...]} or {"text": ...}).

    Returns input_ids, labels, and for the audit: length (before truncation), n_answers (trained
    answers), n_cut (answers max_length cuts), n_eot (answers whose stop token is trained),
    n_stop_appended (final answers whose stop token the template leaves off and was appended),
    system_folded, n_control_text (special tokens' text in the data, encoded as plain text), n_trained
    (trained tokens after truncation). Raises TemplateError (or
    HistoryRewriteError) when an answer or its stop token cannot be placed exactly.
    """
    kinds = {"call": 0, "reasoning": 0}
    if "messages" in example and example["messages"] is not None:
        ids, labels, answer_last_token, turns, folded, n_control = _encode_messages(tokenizer, example, kinds)
        n_answers = len(turns)
        n_eot = sum(1 for t in turns if t.stop is not None)
        n_appended = sum(1 for t in turns if t.appended)
    else:
        enc = tokenizer(example["text"], add_special_tokens=False, return_offsets_mapping=True)
        body, _, n_control = specials_as_text(tokenizer, example["text"], None, enc["input_ids"], enc["offset_mapping"])
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + body
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
        if tokenizer.bos_token_id is not None:
            labels[0] = IGNORE_INDEX
        n_answers, n_eot, answer_last_token = 1, int(tokenizer.eos_token_id is not None), [len(ids) - 1]
        n_appended, folded = 0, False
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
        "n_stop_appended": n_appended,
        "system_folded": folded,
        "n_control_text": n_control,
        "n_trained": sum(1 for x in labels if x != IGNORE_INDEX),
        "n_trained_call": kinds["call"],  # trained tokens in turns that call tools (their reasoning aside)
        "n_trained_reasoning": kinds["reasoning"],  # trained tokens of reasoning
    }


def _encode_messages(tokenizer, example: dict, kinds: dict) -> tuple:
    """(ids, labels, last token of each trained turn, the turns, system folded, special tokens' text
    encoded as text) of a conversation; `kinds` counts the trained tokens in tool-calling turns and in
    reasoning."""
    text, turns, folded = _plan(tokenizer, example)
    spans = [(t.start, t.end) for t in turns]
    thinks = []
    for t in turns:
        pos = text.find(t.reasoning, t.start, t.end) if t.reasoning else -1
        thinks.append((pos, pos + len(t.reasoning)) if pos >= 0 else (0, 0))
    fields = {"messages": example["messages"], "tools": example.get("tools")}
    ids, offsets, n_control = encode_data_text(tokenizer, fields, text,
                                                lambda f: _plan(tokenizer, dict(example, **f))[0])
    labels = [IGNORE_INDEX] * len(ids)
    answer_last_token = [-1] * len(spans)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        for k, (s0, e0) in enumerate(spans):
            if e > s0 and s < e0:
                labels[t] = ids[t]
                answer_last_token[k] = t
                in_reasoning = e > thinks[k][0] and s < thinks[k][1]
                kinds["reasoning"] += in_reasoning
                kinds["call"] += turns[k].call and not in_reasoning
    return ids, labels, answer_last_token, turns, folded, n_control
