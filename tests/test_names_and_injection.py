"""Issue 22, "names, injection, special tokens": the run is named once, run names are whole lines,
and every value written into an Ollama Modelfile parses back as itself (one FROM, no injected lines)."""

from __future__ import annotations

import pytest

from lib.__main__ import main
from lib.run.config import apply_overrides, make_config
from lib.run.errors import ConfigError
from lib.run.paths import check_run_name, run_paths

EXAMPLE = "data/examples/alpaca_instruction_response.jsonl"


@pytest.mark.parametrize("name", ["demo\n", "demo\r", "\ndemo", "de\nmo", "demo ", "../demo", ""])
def test_run_name_with_a_newline_or_other_junk_is_refused(name):
    with pytest.raises(ConfigError, match="is not usable"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["demo", "a", "run_1.2-x", "x" * 100])
def test_ordinary_run_names_are_accepted(name):
    assert check_run_name(name) == name


def test_prepare_refuses_a_run_name_ending_in_a_newline(outputs, capsys):
    assert main(["prepare", "--run", "demo\n", "--data", EXAMPLE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run name 'demo\\n' is not usable") and "\n" not in err
    assert not [p for p in outputs.iterdir() if not p.name.startswith(".")]


def test_set_run_cannot_rename_the_run(outputs, capsys):
    """`prepare --run A --set run=B` once said "into outputs/A" and wrote outputs/B (over B's config)."""
    assert main(["prepare", "--run", "A", "--data", EXAMPLE, "--set", "run=B"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 'run' cannot be overridden (run='B')") and "\n" not in err
    assert not run_paths("A").root.exists() and not run_paths("B").root.exists()


def test_set_run_is_refused_on_every_stage_but_the_same_name_is_harmless():
    cfg = make_config("tiny", run="A")
    with pytest.raises(ConfigError, match="'run' cannot be overridden"):
        apply_overrides(cfg, ["run=B"])
    with pytest.raises(ConfigError, match="'run' cannot be overridden"):
        apply_overrides(cfg, {"run": "A\n"})
    assert apply_overrides(cfg, ["run=A"]).run == "A"
    assert apply_overrides(cfg, {"run": None}).run == "A"  # a notebook parameter left at None keeps it


# --- the Modelfile --------------------------------------------------------------------------------------------

def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, argument)] as Ollama reads a Modelfile (a port of its parser/parser.go state machine:
    no escapes; a value ends at the first line end where the text so far, stripped, unquotes; characters
    that are not printable, save spaces and line ends inside a value, are dropped)."""
    commands, state, buf, name = [], "nil", "", ""

    def unquote(s):
        for q in ('"""', '"'):
            if s.startswith(q):
                return (s[len(q):-len(q)], True) if len(s) >= 2 * len(q) and s.endswith(q) else ("", False)
        return s, True

    for r in text:
        newline, space = r in "\r\n", r in " \t"
        keep = r  # the rune written to the buffer after the transition (None: dropped, as Go's 0)
        if state == "nil":
            nxt, keep = ("comment", None) if r == "#" else ("nil", None) if space or newline else ("name", r)
        elif state in ("name", "parameter"):
            ok = r.isascii() and (r.isalpha() or (state == "parameter" and (r.isdigit() or r == "_")))
            assert ok or space, f"invalid command at {buf + r!r}"
            nxt, keep = (state, r) if ok else ("value", None)
        elif state == "value":
            nxt = "nil" if newline or space else "value"
        else:  # comment
            nxt, keep = ("nil" if newline else "comment"), None
        if nxt != state:
            if state == "name":
                assert buf.lower() in {"from", "template", "system", "adapter", "parameter", "license", "message"}, buf
                name = buf.lower()
                nxt = "parameter" if name == "parameter" else nxt
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or space:
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, "unexpected end of file"
        commands.append((name, value))
    return commands


HOSTILE = [
    'Be brief."""\nFROM ./evil.gguf\nADAPTER ./evil\nSYSTEM """Be brief.',
    'x"""   \r\nADAPTER /etc/passwd\n"""',
    '"""\nFROM evil',
    'C:\\new\\table says \\"hi\\" and \\n stays two characters',
    'ends with quotes """',
    'three """ quotes mid-line and "two" "" ok',
    "  spaces around, and\n\n\tlines\n  ",
    "SYSTEM \"\"\"nested\"\"\" is text",
]


@pytest.fixture(scope="module")
def tiny_tok(session_outputs):
    from transformers import AutoTokenizer

    from lib.run.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


def _modelfile(tok, system):
    from lib.ship.ollama import modelfile_text

    cfg = make_config("tiny", run="demo", overrides={"data.system_prompt": system})
    return modelfile_text("demo-q8_0.gguf", tok, cfg, add_bos=True)


def test_the_parser_reads_what_ollama_reads():
    text = 'FROM ./m.gguf\n# a comment\nSYSTEM """a\n"b"\n"""\nPARAMETER stop "<|x|>"\nPARAMETER num_ctx 8\n'
    assert parse_modelfile(text) == [("from", "./m.gguf"), ("system", 'a\n"b"\n'), ("stop", "<|x|>"), ("num_ctx", "8")]
    # the injection the issue found: a system prompt closing its quotes starts a FROM line
    text = 'FROM ./m.gguf\nSYSTEM """x"""\nFROM ./evil.gguf\n'
    assert [c for c, _ in parse_modelfile(text)] == ["from", "system", "from"]


@pytest.mark.parametrize("system", HOSTILE)
def test_a_hostile_system_prompt_never_adds_a_line_to_the_modelfile(tiny_tok, system):
    """Written, it parses back as itself with exactly one FROM; or it is refused in one line."""
    from lib.ship.ollama import unwritable

    if unwritable(system) is not None:
        with pytest.raises(ConfigError, match=r"^data.system_prompt cannot be written into the Ollama Modelfile: "):
            _modelfile(tiny_tok, system)
        return
    commands = parse_modelfile(_modelfile(tiny_tok, system))
    assert [c for c, _ in commands].count("from") == 1 and "adapter" not in [c for c, _ in commands]
    assert dict(commands)["from"] == "./demo-q8_0.gguf"
    assert [v for c, v in commands if c == "system"] == [system]


def test_which_hostile_values_are_refused():
    from lib.ship.ollama import unwritable

    refused = [s for s in HOSTILE if unwritable(s)]
    assert refused == HOSTILE[:3]  # only a closing """ at a line end cannot be written; the rest round-trip
    assert "drops" in unwritable("a\x00b") and "drops" in unwritable("zero\u200bwidth")
    assert unwritable("<|im_end|>", quotes='"') is None and unwritable('say "x"', quotes='"')


def test_template_and_stops_round_trip(tiny_tok):
    from lib.data.templates import stop_token_ids
    from lib.ship.ollama import ollama_template, template_pieces

    commands = parse_modelfile(_modelfile(tiny_tok, "Be brief."))
    stops = [v for c, v in commands if c == "stop"]
    assert stops == tiny_tok.convert_ids_to_tokens(stop_token_ids(tiny_tok))
    assert [v for c, v in commands if c == "template"] == [ollama_template(template_pieces(tiny_tok), False)]
    assert dict(commands)["num_predict"] == str(make_config("tiny").generation.max_new_tokens)


def test_a_stop_token_that_cannot_be_written_is_refused(tiny_tok, monkeypatch):
    import lib.ship.ollama

    monkeypatch.setattr(lib.ship.ollama, "stop_token_ids", lambda tok: [0])
    monkeypatch.setattr(type(tiny_tok), "convert_ids_to_tokens", lambda self, ids: ['<"end">\n'])
    with pytest.raises(ConfigError, match="stop token '<\"end\">\\\\n' cannot be written"):
        _modelfile(tiny_tok, None)


def test_export_refuses_an_unwritable_system_prompt_before_any_work(monkeypatch):
    from lib.ship import export

    cfg = make_config("tiny", run="demo", overrides={"data.system_prompt": HOSTILE[0]})
    monkeypatch.setattr(export, "load_config", lambda path: cfg)
    monkeypatch.setattr(export, "require", lambda *a: None)
    monkeypatch.setattr(export, "check_result", lambda *a, **kw: None)
    monkeypatch.setattr(export, "llama_cpp_version", lambda: pytest.fail("export went on"))
    paths = run_paths("demo")
    monkeypatch.setattr(export.Path, "exists", lambda self: True)
    with pytest.raises(ConfigError, match="data.system_prompt cannot be written"):
        export._export_settings(paths, None, [])
