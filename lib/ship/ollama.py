"""The Ollama Modelfile: FROM the GGUF, the chat template as an Ollama (Go) template, stops, SYSTEM, settings.

    from lib.ship.ollama import modelfile_text
    text = modelfile_text("demo-q8_0.gguf", tokenizer, cfg, add_bos=True)   # export/Modelfile

The template is cut from the chat template's renderings of the probe conversations
(lib.data.tokenization.probe_renderings, the same probe that finds the stop tokens) into the literal
pieces around each message, kept only when those pieces reproduce every rendering exactly.
"""

from __future__ import annotations

import os
import re

from lib.data.templates import PROBE, end_of_turn_token, probe_messages, probe_renderings, stop_token_ids
from lib.run.errors import ConfigError


def _head(tokenizer, text: str) -> str:
    """bos, when the template writes it once at the start (not when bos also opens each turn)."""
    bos = tokenizer.bos_token
    return bos if bos and text.startswith(bos) and text.count(bos) == 1 else ""


def _common_suffix(*texts: str) -> str:
    return os.path.commonprefix([t[::-1] for t in texts])[::-1]


def template_pieces(tokenizer) -> dict | None:
    """The chat template cut into the literal pieces an Ollama (Go) template puts around each message.

    Cut from the probe renderings (lib.data.tokenization.probe_renderings) and kept only if the pieces
    reproduce those renderings exactly; None when the template is not "fixed text around each role's
    content" (then the Modelfile has no TEMPLATE and Ollama falls back to the GGUF's template).
    `first` is text written before a first message that is not a system message (a template's
    default system prompt, as SmolLM2's and Qwen's).
    """
    rendered = probe_renderings(tokenizer)
    one, two, with_system = rendered["u1+"], rendered["u1 a1 u2+"], rendered["s u1+"]
    s, u1, a1, u2 = PROBE["s"], PROBE["u1"], PROBE["a1"], PROBE["u2"]
    probes = ["u1+", "u1 a1 u2+"]
    if one is None or two is None:  # the template refuses these conversations
        return None
    try:
        head = _head(tokenizer, two)
        first, gen = one[len(head):].split(u1)
        before, x2, x3, after = re.split("|".join((u1, a1, u2)), two[len(head):])
    except ValueError:  # the template does not render them verbatim
        return None
    x1 = pre_s = None
    try:
        pre_s, rest = (with_system or "")[len(head):].split(s)
        x1 = rest.split(u1)[0]
        probes.append("s u1 a1 u2+")
    except ValueError:
        pass  # no system messages (the Modelfile then gets no SYSTEM line)
    pre_u = _common_suffix(*[t for t in (first, x3, x1) if t is not None])
    eot = end_of_turn_token(tokenizer)
    if eot and eot in pre_u:  # the end of the previous turn belongs to it, not to the next user turn
        cut = pre_u.rfind(eot) + len(eot)
        pre_u = pre_u[cut + len(pre_u[cut:]) - len(pre_u[cut:].lstrip("\n")):]
    pieces = {"head": head, "first": first[:len(first) - len(pre_u)], "pre_user": pre_u, "generation": gen,
              "pre_assistant": x2, "post_assistant": x3[:len(x3) - len(pre_u)],
              "pre_system": pre_s, "post_system": None if x1 is None else x1[:len(x1) - len(pre_u)]}
    if any(rendered[k] != head + render_with_pieces(pieces, probe_messages(k)) for k in probes):
        return None
    return pieces


def render_with_pieces(pieces: dict, messages: list[dict]) -> str:
    """What the Modelfile's template renders for `messages` (ending with a user turn), minus bos."""
    out = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if i == 0 and m["role"] != "system":
            out.append(pieces["first"])
        if m["role"] == "system" and pieces["pre_system"] is not None:
            out += [pieces["pre_system"], m["content"], pieces["post_system"]]
        elif m["role"] == "user":
            out += [pieces["pre_user"], m["content"], pieces["generation"] if last else ""]
        elif m["role"] == "assistant":
            out += [pieces["pre_assistant"], m["content"], "" if last else pieces["post_assistant"]]
    return "".join(out)


def ollama_template(pieces: dict, with_head: bool) -> str:
    """The same pieces as an Ollama Go template (one line: `{{-` would trim the pieces' newlines)."""
    def lit(s):
        return s.replace("{{", '{{ "{{" }}')

    system = (f'{{{{ if eq .Role "system" }}}}{lit(pieces["pre_system"])}{{{{ .Content }}}}'
              f'{lit(pieces["post_system"])}{{{{ else if eq .Role "user" }}}}') if pieces["pre_system"] is not None \
        else '{{ if eq .Role "user" }}'
    return ((lit(pieces["head"]) if with_head else "")
            + '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            + (f'{{{{ if and (eq $i 0) (ne .Role "system") }}}}{lit(pieces["first"])}{{{{ end }}}}' if pieces["first"] else "")
            + system + f'{lit(pieces["pre_user"])}{{{{ .Content }}}}{{{{ if $last }}}}{lit(pieces["generation"])}{{{{ end }}}}'
            + f'{{{{ else if eq .Role "assistant" }}}}{lit(pieces["pre_assistant"])}{{{{ .Content }}}}'
            + f'{{{{ if not $last }}}}{lit(pieces["post_assistant"])}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}')


def unwritable(value: str, quotes: str = '"""') -> str | None:
    """Why `value` cannot be written between `quotes` into a Modelfile so that Ollama reads it back as
    itself, or None. Ollama's parser has no escapes: it drops characters that are not printable (save
    space, tab and line ends), and a quoted value ends at the first line end where the text so far ends
    with the closing quote (so `\"\"\"` then a new line would end a SYSTEM and start a FROM line)."""
    odd = next((c for c in value if not (c.isprintable() or c in " \t\r\n")), None)
    if odd is not None:
        return f"it holds the character {odd!r}, which Ollama drops"
    end = re.escape(quotes) + r"[ \t]*[\r\n]" if quotes == '"""' else r'["\r\n]'
    if re.search(end, value):
        where = "at a line end" if quotes == '"""' else "or a line end"
        return f"it holds {quotes} ({where}), which would end the value early (a Modelfile has no escapes)"
    return None


def _quoted(key: str, value: str, quotes: str = '"""') -> str:
    why = unwritable(value, quotes)
    if why:
        raise ConfigError(f"{key} cannot be written into the Ollama Modelfile: {why}; change it and export again")
    return f"{quotes}{value}{quotes}"


def check_modelfile_values(cfg) -> None:
    """Refuse, before any export work, a setting the Modelfile cannot hold as it is (the system prompt)."""
    if cfg.data.system_prompt:
        _quoted("data.system_prompt", cfg.data.system_prompt)


def modelfile_text(gguf_name: str, tokenizer, cfg, add_bos: bool) -> str:
    """An Ollama Modelfile: FROM the GGUF, TEMPLATE, a stop per end-of-turn token, SYSTEM, settings."""
    g = cfg.generation
    lines = [f"# Ollama: ollama create {cfg.run} -f Modelfile && ollama run {cfg.run}",
             f"FROM ./{gguf_name}"]
    pieces = template_pieces(tokenizer)
    if pieces is not None:
        template = ollama_template(pieces, with_head=not add_bos)
        if unwritable(template) is None:
            lines.append(f'TEMPLATE """{template}"""')
        else:
            lines.append("# no TEMPLATE: this chat template's text cannot be written into a Modelfile as it is; "
                         "Ollama uses the template inside the GGUF")
    else:
        lines.append("# no TEMPLATE: this chat template is not fixed text around each message; Ollama uses the "
                     "template inside the GGUF")
    for tok in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)):
        lines.append("PARAMETER stop " + _quoted(f"the stop token {tok!r}", tok, quotes='"'))
    if g.do_sample:
        lines += [f"PARAMETER temperature {g.temperature:g}", f"PARAMETER top_k {g.top_k}", f"PARAMETER top_p {g.top_p:g}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines += [f"PARAMETER repeat_penalty {g.repetition_penalty:g}", f"PARAMETER num_predict {g.max_new_tokens}"]
    if cfg.data.system_prompt and (pieces is None or pieces["pre_system"] is not None):
        lines.append(f"SYSTEM {_quoted('data.system_prompt', cfg.data.system_prompt)}")
    return "\n".join(lines) + "\n"
