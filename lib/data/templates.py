"""Chat templates: what a template does, found by rendering it, and the prompt formats for base models.

    from lib.data.templates import template_info, stop_token_ids, apply_prompt_format
    info = template_info(tokenizer)      # system support, stop tokens, turn openers, tools, reasoning key
    stop_token_ids(tokenizer)            # every end-of-turn token the template writes, and eos

One prober for the whole project: `probe_renderings` renders a fixed set of probe conversations
(marker strings no template alters) and `template_info` reads them; lib/data/tokenization.py places
answers with it, lib/model/generation.py stops on its tokens, lib/ship/ollama.py cuts the same renderings into
the Modelfile's template. The prompt formats (qa, alpaca, chatml, a Jinja string) replace the
model's template for base models (`data.prompt_format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lib.run.errors import first_line


class TemplateError(ValueError):
    """An answer (or its stop token) cannot be placed exactly with this chat template."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "this model"


def apply_template(tokenizer, msgs, add_generation_prompt=False, tools=None) -> str:
    kw = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    except Exception as e:  # jinja raise_exception(...), undefined variables, type errors
        raise TemplateError(f"the chat template refuses this conversation: {first_line(e)}") from None


def special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


MASK = "\ue000"  # a private-use character: no template rewrites it, no tokenizer holds it as a special token


def mask_specials(obj, specials: list[str]):
    """`obj` (a message, a tool schema, ...) with every special token's text in its strings replaced by
    as many MASK characters: rendered, it shows which characters of the rendering come from the data."""
    if isinstance(obj, str):
        for sp in specials:
            obj = obj.replace(sp, MASK * len(sp))
        return obj
    if isinstance(obj, dict):
        return {k: v if k == "role" else mask_specials(v, specials) for k, v in obj.items()}
    return [mask_specials(v, specials) for v in obj] if isinstance(obj, list) else obj


def specials_as_text(tokenizer, text: str, masked: str | None, ids: list, offsets: list) -> tuple[list, list, int]:
    """The data's text is text: every special token the tokenizer found where `masked` has MASK (the
    data, not the template, wrote it) is encoded again as plain text (`split_special_tokens`), so `<s>`
    or `<|im_start|>` in an answer is never the control token. Returns ids, offsets, how many."""
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out_ids, out_offsets, n = [], [], 0
    for i, (s, e) in zip(ids, offsets):
        if i in special_ids and e > s and (masked is None or MASK in masked[s:e]):
            sub = tokenizer(text[s:e], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            out_ids += sub["input_ids"]
            out_offsets += [(s + a, s + b) for a, b in sub["offset_mapping"]]
            n += 1
        else:
            out_ids.append(i)
            out_offsets.append((s, e))
    return out_ids, out_offsets, n


@dataclass(frozen=True)
class TemplateInfo:
    """What a multi-turn probe rendering tells about a chat template."""

    system_ok: bool  # renders a system message (else it is folded into the first user turn)
    stop_history: str | None  # special token written right after an answer that more turns follow
    stop_last: str | None  # ... right after the final answer
    openers: frozenset  # special tokens that open a user turn (or bos): never a stop token
    renders_tools: bool = False  # renders the `tools` schemas it is given
    call_form: tuple | None = None  # (arguments as a JSON string, content null) it renders tool calls with
    stop_call: str | None = None  # special token that ends an assistant turn calling tools (gpt-oss: <|call|>)
    reasoning_key: str | None = None  # message key whose reasoning it renders (reasoning_content, thinking, ...)
    trailing_prompt: str | None = None  # generation prompt it writes after every conversation (Command R7B / A)


_INFO_CACHE: dict = {}
# The probe: marker contents by message name (s: system, u: user, a: assistant), and the conversations
# rendered with them, by names ("+": with the generation prompt, as at inference).
PROBE = {"s": "QzPROBEsysQZ", "u1": "QzPROBEuserOneQZ", "a1": "QzPROBEanswerOneQZ", "u2": "QzPROBEuserTwoQZ",
         "a2": "QzPROBEanswerTwoQZ"}
PROBE_CONVERSATIONS = ("s u1 a1 u2 a2", "u1 a1 u2 a2", "u1", "u1+", "u1 a1 u2+", "s u1+", "s u1 a1 u2+")
_ROLES = {"s": "system", "u": "user", "a": "assistant"}


def probe_messages(names: str) -> list[dict]:
    """The probe conversation `names` ("s u1 a1 u2+") as messages with the marker contents."""
    return [{"role": _ROLES[n[0]], "content": PROBE[n]} for n in names.rstrip("+").split()]


def probe_renderings(tokenizer) -> dict[str, str | None]:
    """The chat template rendered on each of PROBE_CONVERSATIONS (None where it refuses one): what
    template_info reads, and what lib/ship/ollama.py cuts into the Modelfile's template."""
    out = {}
    for names in PROBE_CONVERSATIONS:
        try:
            out[names] = apply_template(tokenizer, probe_messages(names), add_generation_prompt=names.endswith("+"))
        except TemplateError:
            out[names] = None
    return out
_PROBE_TOOL = {"type": "function", "function": {
    "name": "QzPROBEtoolQZ", "description": "QzPROBEdescQZ",
    "parameters": {"type": "object", "properties": {"QzPROBEargQZ": {"type": "string", "description": "QzPROBEpdescQZ"}},
                   "required": ["QzPROBEargQZ"]}}}  # a parameter description: Command R+'s template concatenates it
_REASONING_TEMPLATE_KEYS = ("reasoning_content", "thinking", "reasoning")


def trailing_special(text: str, specials) -> str | None:
    """The special token at the end of `text` before optional whitespace."""
    rest = text.rstrip()
    return next((s for s in specials if rest.endswith(s)), None)


def stop_run(text: str, specials, openers) -> tuple[int, str]:
    """(whitespace before it, the stop) written at the start of `text`, right after an answer: the special
    token there and every special token glued to it that opens no turn, so a stop of several tokens
    (Command A's <|END_RESPONSE|><|END_OF_TURN_TOKEN|>) is trained whole. ("" when none.)"""
    gap = len(text) - len(text.lstrip())
    pos = gap
    while (tok := next((s for s in specials if text.startswith(s, pos)), None)) is not None and tok not in openers:
        pos += len(tok)
    return gap, text[gap:pos]


def last_special(run: str, specials) -> str | None:
    """The last special token of a stop run: the one generation stops on."""
    return next((s for s in specials if run and run.endswith(s)), None)


def _trailing_prompt(tokenizer, rendered: dict, specials) -> str | None:
    """The generation prompt a template writes after every conversation, add_generation_prompt or not
    (Command R7B / A): what follows the closing token of the user's turn; None for other templates."""
    text, u1 = rendered["u1"], PROBE["u1"]
    if not text or text != rendered["u1+"] or u1 not in text:
        return None
    after = text[text.index(u1) + len(u1):]
    closing = leading_special(after, specials)
    rest = after.lstrip()[len(closing):] if closing else ""
    return rest or None


def _probe_tools(tokenizer, specials, openers, trailing_prompt=None) -> tuple:
    """(renders tools, the tool-call form it renders, the token ending a tool-call turn), by rendering."""
    user = [{"role": "user", "content": PROBE["u1"]}]
    try:
        renders_tools = "QzPROBEtoolQZ" in apply_template(tokenizer, user, tools=[_PROBE_TOOL])
    except TemplateError:
        renders_tools = False
    tools = [_PROBE_TOOL] if renders_tools else None
    for args_as_string in (False, True):
        for content_none in (False, True):
            args = {"QzPROBEargQZ": "QzPROBEvalQZ"}
            call = {"type": "function", "id": "Qzprb0001", "function": {
                "name": "QzPROBEtoolQZ", "arguments": json.dumps(args) if args_as_string else args}}
            msg = {"role": "assistant", "content": None if content_none else "", "tool_calls": [call]}
            try:
                prompt = apply_template(tokenizer, user, True, tools)
                text = apply_template(tokenizer, user + [msg], tools=tools)
            except TemplateError:
                continue
            reply = text[len(prompt):] if text.startswith(prompt) else text[text.index(PROBE["u1"]):]
            if trailing_prompt and reply.endswith(trailing_prompt):
                reply = reply[: -len(trailing_prompt)]
            if "QzPROBEtoolQZ" in reply and "QzPROBEvalQZ" in reply and '\\"QzPROBEargQZ' not in reply:
                stop = trailing_special(reply, specials)
                return renders_tools, (args_as_string, content_none), None if stop in openers else stop
    return renders_tools, None, None


def _probe_reasoning(tokenizer) -> str | None:
    """The message key whose reasoning the template renders on a final answer, or None."""
    for key in _REASONING_TEMPLATE_KEYS:
        msgs = [{"role": "user", "content": PROBE["u1"]},
                {"role": "assistant", "content": PROBE["a1"], key: "QzPROBEthinkQZ"}]
        try:
            if "QzPROBEthinkQZ" in apply_template(tokenizer, msgs):
                return key
        except TemplateError:
            continue
    return None


def leading_special(text: str, specials) -> str | None:
    """The special token at the start of `text` after optional whitespace."""
    rest = text.lstrip()
    return next((s for s in specials if rest.startswith(s)), None)


def template_info(tokenizer) -> TemplateInfo:
    """Probe the chat template once (cached): system support, stop tokens, turn openers.

    A special token right after an answer is its stop token unless it is what opens the next
    user turn (a template that writes no end-of-turn token, e.g. `<|assistant|>...<|user|>`, or
    Baichuan 2's `<reserved_106>`): a turn opener is never a stop. It counts as an end-of-turn token
    when it also follows the final answer, is eos, or closes the system turn (gpt-oss's `<|end|>`)
    without opening the user's. Special tokens glued to it that open no turn belong to the stop
    (Command A's `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`): stop_last / stop_history name the last
    one, which generation stops on.
    """
    key = (tokenizer.chat_template, tuple(special_strings(tokenizer)), tokenizer.bos_token, tokenizer.eos_token)
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    specials = special_strings(tokenizer)
    rendered = probe_renderings(tokenizer)
    system_ok = rendered["s u1 a1 u2 a2"] is not None
    text = rendered["s u1 a1 u2 a2"] if system_ok else rendered["u1 a1 u2 a2"] or ""
    user_prefix = (rendered["u1"] or "").split(PROBE["u1"])[0]
    bos = tokenizer.bos_token if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token else None
    openers = {s for s in specials if s in user_prefix} | ({bos} if bos else set())
    stop_history, stop_last = _first_stops(tokenizer, text, specials, openers, bos, user_prefix)
    openers -= {stop_history, stop_last, tokenizer.eos_token}
    stop_history, stop_last = (last_special(stop_run(after, specials, openers)[1], specials) if first else None
                               for first, after in ((stop_history, _after(text, "a1")), (stop_last, _after(text, "a2"))))
    trailing = _trailing_prompt(tokenizer, rendered, specials)
    renders_tools, call_form, stop_call = _probe_tools(tokenizer, specials, openers, trailing)
    info = TemplateInfo(system_ok, stop_history, stop_last, frozenset(openers), renders_tools, call_form, stop_call,
                        _probe_reasoning(tokenizer), trailing)
    _INFO_CACHE[key] = info
    return info


def _after(text: str, name: str) -> str:
    marker = PROBE[name]
    return text[text.index(marker) + len(marker):] if marker in text else ""


def _first_stops(tokenizer, text: str, specials, openers, bos, user_prefix) -> tuple:
    """(stop after earlier answers, stop after the final one): the first special token after each."""
    sys_, a1, u2, a2 = PROBE["s"], PROBE["a1"], PROBE["u2"], PROBE["a2"]
    if not all(p in text for p in (a1, u2, a2)):
        return None, None
    stop_last = leading_special(_after(text, "a2"), specials)
    stop_last = None if stop_last == bos else stop_last
    stop_history = leading_special(text[text.index(a1) + len(a1): text.index(u2)], specials)
    closes_system = sys_ in text and leading_special(_after(text, "s"), specials)
    if closes_system and closes_system == trailing_special(user_prefix, specials):
        closes_system = None  # it opens the user's turn (Baichuan 2: the system text, then <reserved_106>)
    if stop_history in openers and stop_history not in (stop_last, tokenizer.eos_token, closes_system):
        stop_history = None
    return stop_history, stop_last


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template writes right after a final assistant answer (e.g. <|im_end|>).

    Falls back to the one it writes after earlier answers; None when the template writes none
    (then only `eos_token` stops generation, and the audit reports the answers without a stop).
    """
    if not has_chat_template(tokenizer):
        return tokenizer.eos_token
    info = template_info(tokenizer)
    return info.stop_last or info.stop_history


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: every end-of-turn token the template uses, and eos; no duplicates."""
    toks = [tokenizer.eos_token]
    if has_chat_template(tokenizer):
        info = template_info(tokenizer)
        toks = [info.stop_last, info.stop_history, tokenizer.eos_token, info.stop_call]
    ids = []
    for tok in toks:
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


# ----------------------------------------------------------------------------- prompt formats

DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_BOS = "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
PROMPT_FORMATS = {
    # The seeds' GPT-Neo prompt: "Question: ...\nAnswer:", the answer after a space, then eos.
    "qa": (
        _BOS + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token + '\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
    ),
    # Stanford Alpaca: a system message takes the place of the "Below is an instruction..." preamble.
    "alpaca": (
        _BOS + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # ChatML; the turn ends with <|im_end|> when the vocabulary has it as a token, else with eos.
    "chatml": (
        _BOS + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + EOT + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def prompt_format_template(tokenizer, prompt_format: str) -> str:
    """The Jinja chat template of a named prompt format (qa, alpaca, chatml) or a custom Jinja string."""
    if prompt_format == "chatml":
        has_im_end = "<|im_end|>" in tokenizer.get_vocab()
        eot = "'<|im_end|>'" if has_im_end else "eos_token"
        return PROMPT_FORMATS["chatml"].replace("EOT", eot)
    if prompt_format in PROMPT_FORMATS:
        return PROMPT_FORMATS[prompt_format]
    if "{{" in prompt_format or "{%" in prompt_format:
        return prompt_format
    raise ValueError(f"data.prompt_format: '{prompt_format}' is neither auto, "
                     f"{', '.join(PROMPT_FORMATS)} nor a Jinja template")


def apply_prompt_format(tokenizer, prompt_format: str | None = "auto") -> bool:
    """Set the tokenizer's chat template from `data.prompt_format`.

    auto: keep the model's own chat template; a tokenizer without one gets DEFAULT_CHAT_TEMPLATE
    (`<|role|>` lines ending with eos). qa / alpaca / chatml / a Jinja string: that template,
    replacing the model's. The template is saved with the adapter, so chat, merge and export
    render conversations exactly as training did. Returns True when the template was changed.
    """
    if prompt_format in (None, "", "auto"):
        return ensure_chat_template(tokenizer)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token to end an answer with")
    tokenizer.chat_template = prompt_format_template(tokenizer, prompt_format)
    return True


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


def eos_stop(tokenizer, info: TemplateInfo) -> str | None:
    """The tokenizer's eos, where it is the stop of a template that writes none after an answer: appended
    after each answer (one assistant turn per example), as Baichuan 2's and ChatGLM2's generation stop on it.
    None when the template writes a stop of its own, or eos is missing or opens a turn."""
    eos = tokenizer.eos_token
    if info.stop_last or info.stop_history or not eos or eos in info.openers or eos == tokenizer.bos_token:
        return None
    return eos
