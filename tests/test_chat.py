"""Chat (lib/ship/chat.py): the chat function, streaming, stopping at end-of-turn, the session, the
widget and `python -m lib chat`.

Stopping is tested on a "chain" model: the tiny Llama with its attention and MLP outputs zeroed,
so each position's logits depend only on the current token, and with embeddings and an untied
lm_head set so that greedy decoding after the generation prompt writes a fixed chain of tokens.
Its real `generate` must then stop exactly at the end-of-turn token, or run to max_new_tokens
when the chain never reaches it.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch

from lib.data.prompts import render_prompt
from lib.data.templates import end_of_turn_token
from lib.run.errors import MissingStageError, SFTError
from lib.run.settings import GenerationSettings

HISTORY = [{"role": "user", "content": "Why does ice float on water?"}]


def chain_model(tokenizer, chain: list[int], end_with_eot: bool = True):
    """A Llama whose greedy reply to any prompt is `chain`, then (optionally) the end-of-turn token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.run.tiny import tiny_model_path

    config = LlamaConfig.from_pretrained(tiny_model_path())
    config.tie_word_embeddings = False
    config.eos_token_id = None  # only the chat function's stop tokens may stop it
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    start = tokenizer(render_prompt(tokenizer, HISTORY), add_special_tokens=False)["input_ids"][-1]
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    # Transitions: prompt end -> chain[0] -> ... -> chain[-1] -> eot -> chain[0] (so the model would go on).
    seq = [start, *chain, eot, chain[0]] if end_with_eot else [start, *chain, chain[0]]
    transitions = dict(zip(seq, seq[1:], strict=False))
    assert len(transitions) == len(seq) - 1, "chain tokens must be distinct"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (src, dst) in enumerate(transitions.items()):
            emb[src] = 0.0
            emb[src, k] = 1.0  # one direction per source token; RMSNorm scales it to sqrt(hidden)
            head[dst, k] = 10.0
    model.eval()
    return model, eot


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


@pytest.fixture(scope="module")
def chain(tiny_tokenizer):
    ids = tiny_tokenizer("How does it", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2
    return ids


def test_reply_stops_at_end_of_turn(tiny_tokenizer, chain):
    from lib.model.generation import generate_reply
    from lib.ship.chat import chat

    model, eot = chain_model(tiny_tokenizer, chain)
    settings = GenerationSettings(max_new_tokens=20)
    r = generate_reply(model, tiny_tokenizer, HISTORY, settings=settings)
    assert r["token_ids"] == [*chain, eot]  # stopped right at the end-of-turn token
    assert r["stopped"] is True
    expected = tiny_tokenizer.decode(chain, skip_special_tokens=True).strip()
    assert r["text"] == expected
    assert chat(model, tiny_tokenizer, HISTORY, settings=settings) == expected


def test_reply_without_end_of_turn_runs_to_max_new_tokens(tiny_tokenizer, chain):
    from lib.model.generation import generate_reply

    model, eot = chain_model(tiny_tokenizer, chain, end_with_eot=False)
    r = generate_reply(model, tiny_tokenizer, HISTORY, settings=GenerationSettings(max_new_tokens=11))
    assert r["n_tokens"] == 11 and r["stopped"] is False
    assert eot not in r["token_ids"]
    assert r["token_ids"][: len(chain) + 1] == [*chain, chain[0]]


def test_streaming_joins_to_the_reply(tiny_tokenizer, chain):
    from lib.ship.chat import chat

    model, _ = chain_model(tiny_tokenizer, chain)
    settings = GenerationSettings(max_new_tokens=20)
    pieces = list(chat(model, tiny_tokenizer, HISTORY, settings=settings, stream=True, timeout=30))
    assert len(pieces) >= 2  # it streams: more than one piece
    assert "".join(pieces).strip() == chat(model, tiny_tokenizer, HISTORY, settings=settings)
    # Without end-of-turn the stream runs to max_new_tokens (and still ends).
    looping, _ = chain_model(tiny_tokenizer, chain, end_with_eot=False)
    text = "".join(chat(looping, tiny_tokenizer, HISTORY, settings=GenerationSettings(max_new_tokens=9),
                        stream=True, timeout=30))
    assert len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) >= 8


def test_stream_timeout_is_a_clear_error(tiny_tokenizer, chain):
    from lib.ship.chat import chat

    model, _ = chain_model(tiny_tokenizer, chain, end_with_eot=False)
    with pytest.raises(SFTError, match="no text from the model"):
        list(chat(model, tiny_tokenizer, HISTORY, settings=GenerationSettings(max_new_tokens=200),
                  stream=True, timeout=1e-6))


def test_session_history_system_prompt_and_widget(tiny_tokenizer, chain):
    from lib.model.generation import conversation
    from lib.ship.chat import ChatSession, chat_widget

    model, _ = chain_model(tiny_tokenizer, chain)
    expected = tiny_tokenizer.decode(chain, skip_special_tokens=True).strip()
    session = ChatSession(model, tiny_tokenizer, GenerationSettings(max_new_tokens=20), system="Ask questions.")
    assert conversation(HISTORY, session.system)[0] == {"role": "system", "content": "Ask questions."}
    assert session.send(HISTORY[0]["content"]) == expected
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == expected

    ui = chat_widget(session)
    ui.input.value = "And why?"
    ui.send_button.click()  # the same path as a click in the browser: streams, then shows the history
    assert len(session.history) == 4 and session.history[2]["content"] == "And why?"
    assert "And why?" in ui.conversation.value and expected in ui.conversation.value
    assert ui.input.value == "" and not ui.send_button.disabled
    ui.clear_button.click()
    assert session.history == [] and "No messages yet" in ui.conversation.value


@pytest.mark.parametrize("history, message", [
    ([], "last message must be the user's"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be the user's"),
    ([{"role": "robot", "content": "a"}], "message 1"),
    ([{"role": "user"}], "message 1"),
])
def test_bad_history_is_a_clear_error(history, message):
    from lib.model.generation import conversation

    with pytest.raises(SFTError, match=message):
        conversation(history)


def test_cli_without_a_run_exits_2(outputs, capsys):
    from lib.__main__ import main

    assert main(["chat", "--run", "absent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "01_prepare_data" in err and "Traceback" not in err


# ------------------------------------------------------------------------- on the trained run


def test_cli_prompt_prints_one_reply(trained_run, capsys):
    from lib.__main__ import main
    from lib.ship.chat import load_session

    assert main(["chat", "--run", trained_run, "--prompt", "Why does ice float on water?"]) == 0
    out = capsys.readouterr().out
    session = load_session(trained_run)
    expected = session.send("Why does ice float on water?")  # greedy: the same reply
    assert out.strip() == expected and expected


def test_trained_model_generates_with_end_of_turn_stop(trained_run):
    """On the trained run, the stop criteria hold the template's end-of-turn token, and the reply is
    the model's greedy continuation cut exactly at the first stop id, or at max_new_tokens when
    there is none: compared with the same greedy continuation generated with no stop ids at all."""
    from lib.model.generation import _inputs, conversation, generate_reply, generation_config
    from lib.ship.chat import load_session

    session = load_session(trained_run)
    eot = session.tokenizer.convert_tokens_to_ids(end_of_turn_token(session.tokenizer))
    settings = GenerationSettings(max_new_tokens=12)
    gc = generation_config(settings, session.tokenizer, session.model.generation_config)
    assert eot in gc.eos_token_id
    r = generate_reply(session.model, session.tokenizer, HISTORY, settings=settings)
    unstopped = generation_config(settings, session.tokenizer, session.model.generation_config)
    unstopped.eos_token_id = None  # the reference runs the full 12 tokens
    inputs = _inputs(session.model, session.tokenizer, conversation(HISTORY, None))
    with torch.no_grad():
        full = session.model.generate(**inputs, generation_config=unstopped)[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(full) == 12
    first_stop = next((i for i, t in enumerate(full) if t in gc.eos_token_id), None)
    expected = full if first_stop is None else full[: first_stop + 1]
    assert r["token_ids"] == expected and r["n_tokens"] == len(expected)
    assert r["stopped"] is (first_stop is not None)


def test_cli_chat_loop(trained_run, monkeypatch, capsys):
    from lib.__main__ import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Why is the sky blue?\n/clear\n\nWhat is justice?\n/exit\n"))
    assert main(["chat", "--run", trained_run, "--system", "Answer with questions."]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2


def test_cli_merged_without_merge_exits_2(trained_run, capsys):
    from lib.__main__ import main

    assert main(["chat", "--run", trained_run, "--merged", "--prompt", "hi"]) == 2
    assert "06_merge_and_chat" in capsys.readouterr().err


def test_missing_adapter_names_notebook_03(outputs):
    from lib.run.config import make_config, save_config
    from lib.run.paths import run_paths
    from lib.ship.chat import load_session

    save_config(make_config("tiny", run="noadapter"), run_paths("noadapter").config)
    with pytest.raises(MissingStageError, match="03_train_sft"):
        load_session("noadapter")


def test_prompt_that_is_not_utf8_is_one_error_line_before_the_model_loads(outputs, capsys):
    from lib.__main__ import main

    # A shell passes the byte 0xff as the lone surrogate U+DCFF (Python's surrogateescape).
    assert main(["chat", "--run", "never-trained", "--prompt", "caf\udce9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: chat: --prompt is not valid UTF-8 text (byte 0xe9 at character 4); use UTF-8 text"
    assert main(["chat", "--run", "never-trained", "--system", "\udcff", "--prompt", "hi"]) == 2
    assert "--system is not valid UTF-8 text (byte 0xff" in capsys.readouterr().err


def test_history_that_is_not_utf8_is_a_clear_error():
    from lib.model.generation import conversation

    with pytest.raises(SFTError, match=r"chat: message 2 is not valid UTF-8 text \(byte 0xff at character 3\)"):
        conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok\udcff"},
                      {"role": "user", "content": "and?"}])


def test_cli_chat_loop_skips_a_line_that_is_not_utf8(trained_run, monkeypatch, capsys):
    from lib.__main__ import main

    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe oops\nWhy is the sky blue?\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", "--run", trained_run]) == 0
    captured = capsys.readouterr()
    assert "error: the message is not valid UTF-8 text (byte 0xff at character 1)" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out.count("model> ") == 1  # the next line is answered


def shown_as_text(ui) -> str:
    """The widget's text/plain, what a page without a front end shows: ipywidgets 8 writes it in
    `_repr_mimebundle_`; Colab's 7.7 has none and writes `repr(widget)` (cut at 110) in `_ipython_display_`."""
    if hasattr(ui, "_repr_mimebundle_"):
        return ui._repr_mimebundle_()["text/plain"]
    import inspect

    assert "plaintext = repr(self)" in inspect.getsource(type(ui)._ipython_display_)
    return repr(ui)[:110]


def test_a_reply_cut_at_max_new_tokens_is_marked_and_one_that_stopped_is_not(tiny_tokenizer, chain, capsys):
    """Decided from the token ids: the chain then its end-of-turn token fits in len(chain) + 1 new tokens (stopped,
    no mark); with len(chain) - 1 it is cut (marked, with the limit), in the scripted exchange and the widget."""
    from lib.ship.chat import ChatSession, chat_widget, run_script

    model, _ = chain_model(tiny_tokenizer, chain)
    whole = ChatSession(model, tiny_tokenizer, GenerationSettings(max_new_tokens=len(chain) + 1))
    run_script(whole, [HISTORY[0]["content"]])
    assert whole.last_cut["cut"] is False and "cut at" not in capsys.readouterr().out

    n = len(chain) - 1
    cut = ChatSession(model, tiny_tokenizer, GenerationSettings(max_new_tokens=n))
    run_script(cut, [HISTORY[0]["content"]])
    assert cut.last_cut == {"cut": True, "max_new_tokens": n, "n_tokens": n}
    assert f"[… cut at max_new_tokens={n}: did not stop]" in capsys.readouterr().out
    assert "cut at" not in cut.history[-1]["content"]  # the mark is shown, never fed back to the model
    ui = chat_widget(cut)
    assert "live Jupyter or Colab kernel" in capsys.readouterr().out
    assert shown_as_text(ui) == "(the chat box: shown in a live Jupyter or Colab kernel)"
    ui.input.value = "And why?"
    ui.send_button.click()
    assert ui.status.value == f"[… cut at max_new_tokens={n}: did not stop]"
