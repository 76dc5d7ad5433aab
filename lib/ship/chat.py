"""Chat with the tuned model: one function, a session that keeps the history, a notebook widget.

    python -m lib chat --run demo --prompt "Why does ice float?"   # one reply on stdout
    python -m lib chat --run demo [--system TEXT] [--merged]      # a chat loop in the terminal
    python -m lib chat --run demo --tools tools.json --prompt "Weather in Oslo?"   # shows the call it makes

    from lib.ship.chat import load_session, chat_widget
    session = load_session("demo")               # 4-bit base + adapter, as training saw it
    session.send("Why does ice float?")          # -> the reply (the history grows)
    run_script(session, ["Why?", "And then?"])   # a scripted exchange (no front end: nbval, CI)
    chat_widget(session)                         # ipywidgets: input box, send, clear, streaming

`chat(model, tokenizer, history, system=None, settings=None, stream=False)` renders the
conversation with the tokenizer's own chat template (the one training used), generates with the
run's `generation` settings and stops at the template's end-of-turn token
(`lib.data.templates.stop_token_ids`, via `lib.model.generation.generation_kwargs`). With `stream=True` it returns an iterator of text pieces fed
by transformers' `TextIteratorStreamer` from a generation thread (with a timeout, so a stuck
generation cannot hang the caller).

With `tools` (a list of tool schemas, or a JSON file holding one) the template renders them as in
training, and a reply that calls a tool is shown as the call (`lib.data.toolcalls.parse_tool_call`):
nothing is executed. A template that renders no tools refuses them in one line.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from lib.data.templates import model_name, template_info
from lib.data.toolcalls import load_tools, parse_tool_call
from lib.model.generation import (
    DEFAULT_TIMEOUT,
    conversation,
    generate_reply,
    generation_config,
    stream_reply,
)
from lib.model.loading import load_merged, load_tuned_model
from lib.run.config import check_chat_text, flag, undecodable
from lib.run.context import open_run
from lib.run.errors import SFTError
from lib.run.formatting import CUT_AT_MAX_NEW_TOKENS, mark_cut
from lib.run.paths import require
from lib.run.rundir import check_files, check_result, check_trained
from lib.run.settings import GenerationSettings


def chat(model, tokenizer, history, system: str | None = None, settings: GenerationSettings | None = None,
         stream: bool = False, timeout: float = DEFAULT_TIMEOUT, tools=None, info: dict | None = None):
    """The model's reply to `history` (a list of {"role", "content"} ending with the user's message).

    Returns the reply text, or with stream=True an iterator of text pieces that join to it.
    Generation stops at the end-of-turn token; `settings` are the run's `generation` section;
    `tools` the tool schemas the template renders (check_tools); `info` (streaming) is filled with whether
    max_new_tokens cut the reply (lib.model.generation.stream_reply).
    """
    tools = check_tools(tokenizer, tools)
    if not stream:
        return generate_reply(model, tokenizer, history, system, settings, tools)["text"]
    gc = generation_config(settings, tokenizer, getattr(model, "generation_config", None))
    return stream_reply(model, tokenizer, conversation(history, system), gc, timeout, tools, info)


def check_tools(tokenizer, tools) -> list | None:
    """`tools` (a list or a JSON file) as schemas, refused in one line where the chat template renders none."""
    tools = load_tools(tools)
    if tools and not template_info(tokenizer).renders_tools:
        raise SFTError(f"chat: the chat template of {model_name(tokenizer)} does not render tools (it has no tools "
                       "handling), so the model would never see them: train with a data.prompt_format that renders "
                       "tools, or chat without --tools")
    return tools


def describe_call(reply: str) -> str | None:
    """'tool call: NAME {arguments} (not executed)' for a reply that calls a tool, else None."""
    call = parse_tool_call(reply)
    if call is None:
        return None
    return f"tool call: {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)} (not executed)"


@dataclass
class ChatSession:
    """A model, its tokenizer and generation settings, a system prompt and the history so far."""

    model: object
    tokenizer: object
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT
    source: str = ""
    tools: list | None = None  # tool schemas rendered with every prompt (no execution)
    last_cut: dict = field(default_factory=dict)  # of the last reply: stream_reply's info (cut, max_new_tokens)

    def send(self, message: str) -> str:
        """Answer `message`, add both turns to the history and return the reply."""
        return "".join(self.stream(message))

    def stream(self, message: str) -> Iterator[str]:
        """Like send, piece by piece; the history grows once the reply is complete, and `last_cut` then says
        whether max_new_tokens cut it (the mark to show: `shown(reply)`)."""
        if not isinstance(message, str) or not message.strip():
            raise SFTError("chat: the message is empty")
        history = self.history + [{"role": "user", "content": message.strip()}]
        parts, self.last_cut = [], {}
        for piece in chat(self.model, self.tokenizer, history, self.system, self.settings,
                          stream=True, timeout=self.timeout, tools=self.tools, info=self.last_cut):
            parts.append(piece)
            yield piece
        self.history = history + [{"role": "assistant", "content": "".join(parts).strip()}]

    def shown(self, reply: str) -> str:
        """The last reply as shown to a reader: marked when max_new_tokens cut it."""
        cut = self.last_cut or {}
        return mark_cut(reply, bool(cut.get("cut")), CUT_AT_MAX_NEW_TOKENS.format(n=cut.get("max_new_tokens")))

    def clear(self) -> None:
        self.history = []


def load_session(run: str, merged: bool = False, system: str | None = None, tools=None) -> ChatSession:
    """A chat session on the run's tuned model: base + adapter (the 4-bit base training used), or
    with merged=True the merged 16-bit model in merged/. `tools`: a list of tool schemas or a JSON file."""
    merged = flag("merged (CHAT_WITH_MERGED in notebook 06)", merged)
    tools = load_tools(tools)  # a bad file is named before the model loads
    ctx = open_run(run, "chat")
    paths, cfg = ctx.paths, ctx.cfg
    if merged:
        # complete (not a killed merge), every file as merge wrote it (hashed: ~1 s a 500 MB), and not a
        # merge of an adapter trained before a retrain
        check_result(paths, "merge")
        require(paths, "merged")
        check_files(paths, "merge", paths.merged.glob("*.safetensors"))  # a run merged before manifests
        model, tokenizer = load_merged(paths.merged, info=ctx.device)
        source = str(paths.merged)
    else:
        require(paths, "adapter")
        check_trained(paths)  # a damaged adapter is named, with the stage to rerun
        model, tokenizer = load_tuned_model(cfg, paths.adapter, info=ctx.device)  # with the saved template
        source = f"{cfg.model.name_or_path} + {paths.adapter}"
    model.eval()
    return ChatSession(model, tokenizer, settings=cfg.generation, system=system, source=source,
                       tools=check_tools(tokenizer, tools))


def run_script(session: ChatSession, prompts) -> list[dict]:
    """Send `prompts` one after another through the session (as the widget does) and print the exchange.

    For runs without a front end (nbval, papermill, CI): the same path as the chat widget.
    """
    for prompt in prompts:
        reply = session.send(prompt)
        call = describe_call(reply) if session.tools else None
        print(f"you> {prompt}\nmodel> {session.shown(reply)}\n" + (f"{call}\n" if call else ""))
    return session.history


def _conversation_html(history: list[dict], partial: str | None = None) -> str:
    rows = []
    shown = list(history) + ([{"role": "assistant", "content": partial + " ▌"}] if partial is not None else [])
    for m in shown:
        who = {"user": "You", "assistant": "Model", "system": "System"}.get(m["role"], m["role"])
        color = {"user": "#e8f0fe", "assistant": "#f1f3f4", "system": "#fff8e1"}.get(m["role"], "#fff")
        body = html.escape(m["content"]).replace("\n", "<br>")
        rows.append(f'<div style="background:{color};padding:6px 10px;margin:4px 0;border-radius:6px">'
                    f"<b>{who}:</b> {body}</div>")
    return "".join(rows) or '<div style="color:#888">No messages yet.</div>'


WIDGET_NOTE = ("The chat box below appears in a live Jupyter or Colab kernel; in a saved page or a headless run "
               "(papermill, nbval) there is no front end to draw it: chat in a terminal with "
               "`python -m lib chat --run RUN_NAME`.")


def chat_widget(session: ChatSession):
    """An ipywidgets chat on `session`: the conversation, an input box, send and clear buttons.

    The reply streams into the conversation as it is generated. Works in Jupyter and Colab (core
    widgets only). Returns the VBox; `display()` it, or leave it as a cell's last expression.
    """
    import ipywidgets as w

    conversation_view = w.HTML(value=_conversation_html(session.history),
                               layout=w.Layout(max_height="400px", overflow="auto", border="1px solid #ddd",
                                               padding="4px"))
    box = w.Textarea(placeholder="Type a message, then press Send", layout=w.Layout(width="70%", height="60px"))
    send = w.Button(description="Send", button_style="primary", icon="paper-plane")
    clear = w.Button(description="Clear", icon="trash")
    status = w.Label(value=f"model: {session.source}" if session.source else "")

    def on_send(_=None):
        text = box.value.strip()
        if not text:
            return
        box.value = ""
        send.disabled = clear.disabled = True
        status.value = "generating…"
        pending = session.history + [{"role": "user", "content": text}]
        partial = ""
        conversation_view.value = _conversation_html(pending, partial)
        try:
            for piece in session.stream(text):
                partial += piece
                conversation_view.value = _conversation_html(pending, partial)
            status.value = session.shown("").strip()  # '[… cut at max_new_tokens=N: did not stop]', or nothing
        except SFTError as e:
            status.value = f"error: {e}"
        finally:
            send.disabled = clear.disabled = False
            conversation_view.value = _conversation_html(session.history)

    def on_clear(_=None):
        session.clear()
        conversation_view.value = _conversation_html(session.history)
        status.value = ""

    send.on_click(on_send)
    clear.on_click(on_clear)
    ui = w.VBox([conversation_view, w.HBox([box, w.VBox([send, clear])]), status])
    # Handles for code (and tests) that drive the widget without a front end.
    ui.input, ui.send_button, ui.clear_button, ui.conversation, ui.status = box, send, clear, conversation_view, status
    print(WIDGET_NOTE)
    # Its plain-text form (what a page without a front end shows) is a note, not a VBox repr: ipywidgets 8
    # (`_repr_mimebundle_`) and Colab's 7.7 (`_ipython_display_`) both write repr(widget) there, which
    # Widget.__repr__ builds with the instance's _gen_repr_from_keys.
    ui._gen_repr_from_keys = lambda keys: WIDGET_TEXT
    return ui


WIDGET_TEXT = "(the chat box: shown in a live Jupyter or Colab kernel)"


def run_chat(run: str, prompt: str | None = None, system: str | None = None, merged: bool = False, tools=None):
    """Entry point of `python -m lib chat`: print one reply to `prompt`, or run a terminal chat loop.

    `tools`: a list of tool schemas or a JSON file (--tools); a reply that calls one is followed by the
    call it makes (not executed). Returns the reply (with a prompt) or the conversation (after the loop).
    """
    check_chat_text(prompt, system)  # before the model loads
    session = load_session(run, merged=merged, system=system, tools=tools)
    if prompt is not None:
        reply = _print_stream(session, prompt)
        sys.stdout.write("\n")
        _print_call(session, reply)
        return reply.strip()
    print(f"chatting with {session.source} (/clear starts over, /exit or Ctrl-D quits)", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the message check, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    while (text := _read_message()) is not None:
        if text == "/clear":
            session.clear()
        elif text:
            sys.stdout.write("model> ")
            reply = ""
            try:
                reply = _print_stream(session, text)
            except KeyboardInterrupt:
                sys.stdout.write(" [interrupted]")
            sys.stdout.write("\n")
            _print_call(session, reply)
    return session.history


def _print_stream(session, text: str) -> str:
    """Print the reply to `text` piece by piece as it is generated; return it whole. A reply cut at
    max_new_tokens is said on stderr (stdout stays the reply alone)."""
    parts = []
    for piece in session.stream(text):
        parts.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    mark = session.shown("").strip()
    if mark:
        sys.stdout.write("\n")
        print(mark, file=sys.stderr, flush=True)
    return "".join(parts)


def _print_call(session, reply: str) -> None:
    call = describe_call(reply) if session.tools else None
    if call:
        print(call)


def _read_message() -> str | None:
    """The next terminal message, stripped: None to quit (/exit, /quit, Ctrl-D), "" for nothing to answer
    (an empty line, or text that is not valid UTF-8: said on stderr)."""
    try:
        text = input("you> ").strip()
    except EOFError:
        print(file=sys.stderr)
        return None
    if text in ("/exit", "/quit"):
        return None
    problem = undecodable(text)
    if problem:
        print(f"error: the message is {problem}; type it again", file=sys.stderr)
        return ""
    return text
