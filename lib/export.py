"""Export (notebook 06): merged/ -> a GGUF for llama.cpp, Ollama and LM Studio, a Modelfile, a parity check.

    python -m lib export --run demo [--quant q8_0] [--set export.parity_tokens=16] [--allow-drift]

    from lib.export import run_export, parity_table
    report = run_export("demo", quant="q4_k_m")   # export/demo-q4_k_m.gguf, export/Modelfile, export/parity.json

The conversion is llama.cpp's own: `convert_hf_to_gguf.py` (with its `conversion/` package and
`gguf-py/`) turns merged/ into a 16/32-bit GGUF, and llama.cpp's quantizer (`llama_model_quantize`,
exposed by llama-cpp-python) makes q8_0, q4_k_m, ... from it. The chat template and the end-of-turn
tokens travel in the GGUF metadata (`tokenizer.chat_template`, eos/eot ids).

Where the converter comes from: the llama-cpp-python source distribution on PyPI carries llama.cpp
(`vendor/llama.cpp/`). On first use `pip download` fetches the sdist of the installed
llama-cpp-python version (76 MB) and the three converter pieces are extracted into
`~/.cache/qlora-notebooks/llama.cpp-<version>/` ($XDG_CACHE_HOME respected), so converter and
runtime are the same llama.cpp. `make install` does this once; offline, set LLAMA_CPP_DIR to a
llama.cpp checkout (any folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/).

Beside the GGUF: an Ollama `Modelfile` (FROM the GGUF, the chat template as an Ollama template,
a `stop` per end-of-turn token of the run, the system prompt the data used, the generation
settings) and `parity.json`: the GGUF run by llama.cpp (llama-cpp-python) against merged/ in
transformers on the eval prompts, both greedy with no repetition penalty:
- prompt tokens: the rendered prompt tokenizes to the same ids in llama.cpp (also when rendered
  from the template inside the GGUF, and from the Modelfile's template);
- greedy agreement: share of answers whose first `export.parity_tokens` tokens are identical;
- perplexity of the eval answers from llama.cpp's logits vs transformers', relative drift;
- stop rate on both sides (llama.cpp stops at the tokens the GGUF marks end-of-generation).
A figure beyond its tolerance (`export.*`) sets "ok": false and is printed; the CLI exits 1.
Everything is built in a temporary folder and moved into export/ file by file when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import GenerationSettings, apply_overrides, load_config
from .errors import MissingStageError, SFTError
from .generation import eval_conversations, generate_reply
from .loading import load_merged, release
from .paths import REPO_ROOT, require, run_paths
from .rundir import (
    check_fresh,
    inputs,
    install,
    remove_leftovers,
    run_lock,
    staging,
    write_atomic,
    write_json,
)
from .scoring import check_examples, perplexity
from .tokenization import IGNORE_INDEX, encode_example, end_of_turn_token, render_prompt, stop_token_ids

# name -> (the converter's --outtype, llama.cpp's quantizer ftype or None)
QUANT_TYPES = {
    "f32": ("f32", None),
    "f16": ("f16", None),
    "bf16": ("bf16", None),
    "q8_0": (None, "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q6_k": (None, "LLAMA_FTYPE_MOSTLY_Q6_K"),
    "q5_k_m": (None, "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    "q4_k_m": (None, "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "q4_0": (None, "LLAMA_FTYPE_MOSTLY_Q4_0"),
}
# Default tolerances by type: (relative perplexity drift, smallest greedy agreement).
# Greedy answers fork at the first near-tie, so quantized types are not held to an agreement (measured on
# SmolLM2-135M: q8_0 drifts 0.34% in perplexity, yet 6 of 8 answers fork within 14 tokens).
TOLERANCES = {"f32": (0.01, 0.75), "f16": (0.01, 0.75), "bf16": (0.01, 0.75), "q8_0": (0.03, 0.0)}
LOW_BIT_TOLERANCE = (0.15, 0.0)
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"


class ExportError(SFTError):
    """The model cannot be exported as asked (no converter, unknown type, conversion failed)."""


# ----------------------------------------------------------------------------- the converter


def llama_cpp_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        raise ExportError(
            "llama-cpp-python is not installed: `pip install -e .[export]` (it compiles llama.cpp: ~7 min on 2 "
            f"cores; on a CPU-only machine set CMAKE_ARGS=\"{PORTABLE_CMAKE_ARGS}\")") from None


def ensure_llama_cpp() -> str:
    """The installed llama-cpp-python version; in Colab, install it first (compiled for the CPU, portable:
    about 10 minutes, once per Colab session). Elsewhere `make install` (pip install -e .[export]) does it."""
    try:
        return llama_cpp_version()
    except ExportError:
        if "google.colab" not in sys.modules:
            raise
    print("installing llama-cpp-python: compiling llama.cpp for the CPU (~10 min, once per session)...", flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python>=0.3.36", "sentencepiece>=0.2"],
                   check=True, env=dict(os.environ, CMAKE_ARGS=PORTABLE_CMAKE_ARGS))
    print(f"installed in {(time.time() - started) / 60:.1f} min")
    return llama_cpp_version()


def converter_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qlora-notebooks"


def _has_converter(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion" / "__init__.py").is_file() \
        and (folder / "gguf-py" / "gguf").is_dir()


def _fetch_converter(version: str, target: Path) -> None:
    """pip download the llama-cpp-python sdist and extract vendor/llama.cpp's converter into `target`."""
    import tarfile

    with staging(target.parent, ".fetch-") as tmp:
        print(f"fetching llama.cpp's converter: the llama-cpp-python {version} source distribution (76 MB, once)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q",
             "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", str(tmp / "sdist")],
            capture_output=True, text=True)
        sdists = list((tmp / "sdist").glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"pip exited {proc.returncode}"
            raise ExportError(
                f"llama.cpp's converter is missing and cannot be fetched ({why}); connect to PyPI once, or set "
                "LLAMA_CPP_DIR to a llama.cpp checkout (a folder with convert_hf_to_gguf.py, conversion/, gguf-py/)")
        out = tmp / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or not member.isfile():
                    continue
                if parts[3] not in (*CONVERTER_PARTS, "LICENSE") or "tests" in parts[4:]:
                    continue
                dest = out.joinpath(*parts[3:])
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not _has_converter(out):
            raise ExportError(f"{sdists[0].name}: holds no vendor/llama.cpp/convert_hf_to_gguf.py with conversion/ "
                              "and gguf-py/; set LLAMA_CPP_DIR to a llama.cpp checkout")
        try:
            os.replace(out, target)
        except OSError:  # another process won the race
            if not _has_converter(target):
                raise


def converter_dir(fetch: bool = True) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/.

    $LLAMA_CPP_DIR if set; else the cached copy for the installed llama-cpp-python version,
    fetched from its sdist on first use."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        folder = Path(env).expanduser()
        if not _has_converter(folder):
            raise ExportError(f"LLAMA_CPP_DIR={folder}: no convert_hf_to_gguf.py with conversion/ and gguf-py/ there "
                              "(point it at a llama.cpp checkout, or unset it to use the cached copy)")
        return folder
    version = llama_cpp_version()
    target = converter_cache() / f"llama.cpp-{version}"
    if not _has_converter(target):
        if not fetch:
            raise ExportError(f"{target}: llama.cpp's converter is not there; run `make install` or an export "
                              "once while online, or set LLAMA_CPP_DIR")
        _fetch_converter(version, target)
    return target


def _plain_byte_level(model_dir: Path) -> bool:
    """tokenizer.json pre-tokenizes exactly like GPT-2 (ByteLevel with its regex, no normalizer)."""
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tj.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not tj.get("normalizer")


def _convert_main(folder: str, argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py from `folder` (in a subprocess: its gguf-py must come first).

    One addition: llama.cpp names BPE pre-tokenizers by a hash of known tokenizers' output; a
    tokenizer it has never seen whose pre-tokenizer is GPT-2's own (ByteLevel with GPT-2's regex, as
    the tiny model's) is written as 'gpt-2' instead of failing. The parity check then verifies that
    llama.cpp tokenizes the prompts exactly as transformers does.
    """
    import runpy

    sys.path[:0] = [folder, str(Path(folder) / "gguf-py")]
    import conversion.base as base  # noqa: E402  (llama.cpp's package)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _plain_byte_level(Path(self.dir_model)):
                base.logger.warning("unknown BPE tokenizer with GPT-2's ByteLevel pre-tokenizer: writing 'gpt-2'")
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    runpy.run_path(str(Path(folder) / "convert_hf_to_gguf.py"), run_name="__main__")


def _conversion_error(log: str, model_dir: Path, log_path: Path) -> ExportError:
    unknown = re.search(r"Model (\S+) is not supported", log)
    if unknown:
        return ExportError(f"{model_dir}: llama.cpp's converter does not know the architecture {unknown.group(1)} "
                           "(convert_hf_to_gguf.py --print-supported-models lists those it does)")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"(\w+(Error|Exception)|ERROR|NotImplementedError)\b", ln)]
    why = (errors or lines or ["no output"])[-1]
    return ExportError(f"{model_dir}: llama.cpp's converter failed: {why[:300]} (full log: {log_path})")


def convert(model_dir, out_file, outtype: str, log_path) -> Path:
    """merged/ -> a GGUF of type f32, f16 or bf16 with llama.cpp's convert_hf_to_gguf.py."""
    folder = converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lib.export", "--convert", str(folder), str(model_dir),
           "--outfile", str(out_file), "--outtype", outtype]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = (proc.stdout or "") + (proc.stderr or "")
    log_path.write_text(log, encoding="utf-8")
    if proc.returncode != 0 or not Path(out_file).exists():
        raise _conversion_error(log, Path(model_dir), log_path)
    return Path(out_file)


@contextlib.contextmanager
def _c_output_to(path: Path):
    """Send what C code writes on stdout/stderr (llama.cpp's quantizer log) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def quantize(in_file, out_file, quant: str, log_path) -> Path:
    """A 16/32-bit GGUF -> `quant` with llama.cpp's quantizer (llama_model_quantize)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant][1])
    params.nthread = os.cpu_count() or 1
    with _c_output_to(Path(log_path)):
        rc = llama_cpp.llama_model_quantize(str(in_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if rc != 0 or not Path(out_file).exists():
        raise ExportError(f"{in_file}: llama.cpp's quantizer failed to make {quant} (status {rc}; log: {log_path})")
    return Path(out_file)


def intermediate_type(model_dir) -> str:
    """The lossless GGUF type for merged/'s weights: f32 for fp32, bf16 for bf16, else f16."""
    try:
        dtype = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("dtype") \
            or json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    except (OSError, ValueError):
        dtype = None
    return {"float32": "f32", "bfloat16": "bf16"}.get(str(dtype), "f16")


# ----------------------------------------------------------------------------- Ollama Modelfile

_S, _U1, _A1, _U2 = "QzSYSqZ", "QzUSERoneqZ", "QzANSWERqZ", "QzUSERtwoqZ"


def _head(tokenizer, text: str) -> str:
    """bos, when the template writes it once at the start (not when bos also opens each turn)."""
    bos = tokenizer.bos_token
    return bos if bos and text.startswith(bos) and text.count(bos) == 1 else ""


def _common_suffix(*texts: str) -> str:
    return os.path.commonprefix([t[::-1] for t in texts])[::-1]


def template_pieces(tokenizer) -> dict | None:
    """The chat template cut into the literal pieces an Ollama (Go) template puts around each message.

    Found by rendering conversations with marker contents, and kept only if the pieces reproduce
    those renderings exactly; None when the template is not "fixed text around each role's
    content" (then the Modelfile has no TEMPLATE and Ollama falls back to the GGUF's template).
    `first` is text written before a first message that is not a system message (a template's
    default system prompt, as SmolLM2's and Qwen's).
    """

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    u1, a1, u2, s = ({"role": r, "content": c} for r, c in
                     (("user", _U1), ("assistant", _A1), ("user", _U2), ("system", _S)))
    probes = [[u1], [u1, a1, u2]]
    try:
        one, two = (render(m) for m in probes)
        head = _head(tokenizer, two)
        first, gen = one[len(head):].split(_U1)
        before, x2, x3, after = re.split("|".join((_U1, _A1, _U2)), two[len(head):])
    except Exception:  # the template refuses these conversations, or does not render them verbatim
        return None
    x1 = pre_s = None
    try:
        pre_s, rest = render([s, u1])[len(head):].split(_S)
        x1 = rest.split(_U1)[0]
        probes.append([s, u1, a1, u2])
    except Exception:
        pass  # no system messages (the Modelfile then gets no SYSTEM line)
    pre_u = _common_suffix(*[t for t in (first, x3, x1) if t is not None])
    eot = end_of_turn_token(tokenizer)
    if eot and eot in pre_u:  # the end of the previous turn belongs to it, not to the next user turn
        cut = pre_u.rfind(eot) + len(eot)
        pre_u = pre_u[cut + len(pre_u[cut:]) - len(pre_u[cut:].lstrip("\n")):]
    pieces = {"head": head, "first": first[:len(first) - len(pre_u)], "pre_user": pre_u, "generation": gen,
              "pre_assistant": x2, "post_assistant": x3[:len(x3) - len(pre_u)],
              "pre_system": pre_s, "post_system": None if x1 is None else x1[:len(x1) - len(pre_u)]}
    try:
        if any(render(m) != head + render_with_pieces(pieces, m) for m in probes):
            return None
    except Exception:
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


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile_text(gguf_name: str, tokenizer, cfg, add_bos: bool) -> str:
    """An Ollama Modelfile: FROM the GGUF, TEMPLATE, a stop per end-of-turn token, SYSTEM, settings."""
    g = cfg.generation
    lines = [f"# Ollama: ollama create {cfg.run} -f Modelfile && ollama run {cfg.run}",
             f"FROM ./{gguf_name}"]
    pieces = template_pieces(tokenizer)
    if pieces is not None:
        template = ollama_template(pieces, with_head=not add_bos)
        if '"""' not in template:
            lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: this chat template is not fixed text around each message; Ollama uses the "
                     "template inside the GGUF")
    for tok in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)):
        lines.append(f"PARAMETER stop {_quote(tok)}")
    if g.do_sample:
        lines += [f"PARAMETER temperature {g.temperature:g}", f"PARAMETER top_k {g.top_k}", f"PARAMETER top_p {g.top_p:g}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines += [f"PARAMETER repeat_penalty {g.repetition_penalty:g}", f"PARAMETER num_predict {g.max_new_tokens}"]
    if cfg.data.system_prompt and (pieces is None or pieces["pre_system"] is not None):
        lines.append(f'SYSTEM """{cfg.data.system_prompt}"""')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parity


def tolerances(cfg, quant: str) -> tuple[float, float]:
    """(relative perplexity drift, smallest greedy agreement) for `quant`: the config's or the type's default."""
    ppl, agree = TOLERANCES.get(quant, LOW_BIT_TOLERANCE)
    e = cfg.export
    return (ppl if e.ppl_tolerance is None else e.ppl_tolerance,
            agree if e.min_agreement is None else e.min_agreement)


def load_gguf(path, n_ctx: int):
    """A GGUF file in llama.cpp (llama-cpp-python), keeping the logits of every position."""
    from llama_cpp import Llama

    # Half the cores: llama.cpp's threads wait for each other spinning, and next to torch's thread pool
    # (already started by the transformers side) all cores made decoding ~10x slower on 2 cores.
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True, verbose=False,
                 n_threads=max(1, (os.cpu_count() or 2) // 2), seed=0)


def _gguf_is_eog(llm, token_id: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token_id))


def llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy answer in llama.cpp (argmax of its logits, no repetition penalty); stops where llama.cpp
    does, at a token the GGUF marks end-of-generation. Same shape as lib.generation.generate_reply."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    new: list[int] = []
    while len(new) < max_new_tokens:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(tok)
        if _gguf_is_eog(llm, tok) or llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([tok])
    return {"token_ids": new, "stopped": bool(new) and _gguf_is_eog(llm, new[-1])}


def llama_perplexity(llm, tokenizer, examples, max_length) -> dict:
    """Perplexity over the same answer tokens as lib.scoring.perplexity, from llama.cpp's logits."""
    import numpy as np

    nll, count = 0.0, 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length)
        ids, labels = enc["input_ids"], enc["labels"]
        where = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
        if not where:
            continue
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        rows = logits[[t - 1 for t in where]]
        top = rows.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=1)))
        nll += float((logz - rows[np.arange(len(where)), [labels[t] for t in where]]).sum())
        count += len(where)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def _gguf_template_ids(llm, messages) -> list[int] | None:
    """Prompt ids as llama-cpp-python's chat completion makes them from the template inside the GGUF."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    bos, eos = llm.token_bos(), llm.token_eos()
    text = lambda t: llm._model.token_get_text(t) if t != -1 else ""  # noqa: E731
    formatter = Jinja2ChatFormatter(template=template, eos_token=text(eos), bos_token=text(bos))
    rendered = formatter(messages=messages)
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def gguf_add_bos(llm) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def _parity_failures(e, n_prompts, same_prompt, eog, ppl, greedy, stop) -> list[str]:
    """One line per parity figure that misses its tolerance."""
    drift, ppl_ll, ppl_hf, ppl_tol = ppl
    agree, n, min_agree = greedy
    stop_ll, stop_hf = stop
    failures = []
    if same_prompt < n_prompts:
        failures.append(f"prompt tokens: {n_prompts - same_prompt} of {n_prompts} prompts tokenize differently "
                        "in llama.cpp (must be 0)")
    if not all(eog.values()):
        failures.append(f"stop tokens: {[t for t, ok in eog.items() if not ok]} are not end-of-generation in the "
                        "GGUF (llama.cpp would not stop there)")
    if not drift <= ppl_tol:
        failures.append(f"perplexity drift {drift:.2%} ({ppl_ll['perplexity']:.4f} llama.cpp vs "
                        f"{ppl_hf['perplexity']:.4f} transformers) > export.ppl_tolerance {ppl_tol:g}")
    if not agree >= min_agree:
        failures.append(f"greedy agreement {agree:.0%} over the first {n} tokens < export.min_agreement {min_agree:g}")
    if not abs(stop_ll - stop_hf) <= e.stop_rate_tolerance:
        failures.append(f"stop rate {stop_ll:.0%} llama.cpp vs {stop_hf:.0%} transformers differs by more than "
                        f"export.stop_rate_tolerance {e.stop_rate_tolerance:g}")
    return failures


def _first_differences(hf_answers, ll_answers) -> list:
    """Per prompt, the first position where the two greedy answers differ (None: identical)."""
    return [next((i for i, (a, b) in enumerate(zip(h["token_ids"], g["token_ids"])) if a != b), None)
            for h, g in zip(hf_answers, ll_answers)]


def _transformers_side(model_dir, chosen, examples, cfg, greedy, progress):
    """merged/ in transformers: (tokenizer, prompt ids, greedy answers, perplexity)."""
    from tqdm.auto import tqdm

    model, tokenizer = load_merged(model_dir)
    prompts = [tokenizer(render_prompt(tokenizer, c[1]), add_special_tokens=False)["input_ids"] for c in chosen]
    hf_answers = [generate_reply(model, tokenizer, c[1], settings=greedy)
                  for c in tqdm(chosen, desc="greedy answers (transformers)", unit="prompt", disable=not progress)]
    ppl_hf = perplexity(model, tokenizer, examples, cfg.eval.batch_size, cfg.train.max_length,
                        desc="perplexity (transformers)", progress=progress)
    del model
    release()
    return tokenizer, prompts, hf_answers, ppl_hf


def check_parity(model_dir, gguf_path, cfg, examples: list[dict], quant: str, progress: bool = True) -> dict:
    """Compare the GGUF in llama.cpp with merged/ in transformers (see the module docstring)."""
    from tqdm.auto import tqdm

    e = cfg.export
    max_length = cfg.train.max_length
    greedy = GenerationSettings(max_new_tokens=cfg.generation.max_new_tokens, do_sample=False,
                                repetition_penalty=1.0, no_repeat_ngram_size=0)
    chosen = eval_conversations(examples)[:e.parity_examples]
    # transformers first, then llama.cpp: both spin up CPU threads, and interleaved they fight for the cores.
    tokenizer, prompts, hf_answers, ppl_hf = _transformers_side(model_dir, chosen, examples, cfg, greedy, progress)
    stops = stop_token_ids(tokenizer)
    pieces = template_pieces(tokenizer)

    n_ctx = max([max_length] + [len(p) + greedy.max_new_tokens + 1 for p in prompts]) + 8
    llm = load_gguf(gguf_path, n_ctx)
    add_bos = gguf_add_bos(llm)
    same_prompt = same_gguf_template = same_modelfile = 0
    ll_answers = []
    for (_, messages, _), ids in tqdm(list(zip(chosen, prompts)), desc=f"greedy answers (llama.cpp, {quant})",
                                      unit="prompt", disable=not progress):
        text = render_prompt(tokenizer, messages)
        same_prompt += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        same_gguf_template += _gguf_template_ids(llm, messages) == ids
        if pieces is not None:
            ollama_text = (pieces["head"] if not add_bos else "") + render_with_pieces(pieces, messages)
            same_modelfile += llm.tokenize(ollama_text.encode("utf-8"), add_bos=add_bos, special=True) == ids
        ll_answers.append(llama_greedy(llm, ids, greedy.max_new_tokens))  # the same prompt ids on both sides
    ppl_ll = llama_perplexity(llm, tokenizer, examples, max_length)
    eog = {t: _gguf_is_eog(llm, t) for t in stops}
    del llm

    k, n = max(len(chosen), 1), e.parity_tokens
    agree = sum(h["token_ids"][:n] == g["token_ids"][:n] for h, g in zip(hf_answers, ll_answers)) / k
    first_diff = _first_differences(hf_answers, ll_answers)
    drift = abs(ppl_ll["perplexity"] - ppl_hf["perplexity"]) / ppl_hf["perplexity"]
    stop_hf = sum(a["stopped"] for a in hf_answers) / k
    stop_ll = sum(a["stopped"] for a in ll_answers) / k
    ppl_tol, min_agree = tolerances(cfg, quant)
    failures = _parity_failures(e, len(chosen), same_prompt, eog, (drift, ppl_ll, ppl_hf, ppl_tol),
                                (agree, n, min_agree), (stop_ll, stop_hf))
    return {
        "ok": not failures,
        "failures": failures,
        "quant": quant,
        "gguf": Path(gguf_path).name,
        "gguf_mb": round(Path(gguf_path).stat().st_size / 2**20, 2),
        "prompts": len(chosen),
        "prompt_tokens": {"identical": same_prompt, "identical_from_gguf_template": same_gguf_template,
                          "identical_from_modelfile_template": same_modelfile if pieces is not None else None},
        "greedy": {"tokens": n, "agreement": agree, "min_agreement": min_agree, "first_difference": first_diff,
                   "max_new_tokens": greedy.max_new_tokens},
        "perplexity": {"llama_cpp": ppl_ll, "transformers": ppl_hf, "relative_drift": drift, "tolerance": ppl_tol},
        "stop_rate": {"llama_cpp": stop_ll, "transformers": stop_hf, "tolerance": e.stop_rate_tolerance},
        "stop_tokens": {"ids": stops, "tokens": tokenizer.convert_ids_to_tokens(stops),
                        "end_of_generation_in_gguf": all(eog.values())},
        "add_bos": add_bos,
        "decoding": "greedy (argmax) on both sides, repetition penalty 1.0, the same prompt token ids",
    }


# ----------------------------------------------------------------------------- the stage


def gguf_name(run: str, quant: str) -> str:
    return f"{run}-{quant}.gguf"


def run_export(run: str, quant: str | None = None, overrides=(), progress: bool = True) -> dict:
    """Entry point of notebook 06's export section and `python -m lib export`: returns the parity report.

    Writes export/<run>-<quant>.gguf, export/Modelfile and export/parity.json (a parity failure is
    reported, "ok": false, not raised; the CLI turns it into exit status 1).
    """
    paths = run_paths(run)
    cfg, quant = _export_settings(paths, quant, overrides)
    examples, _ = check_examples(paths, cfg)
    log_path = write_atomic(paths.logs / "export.log", "")
    with run_lock(paths, "export"):
        remove_leftovers(paths.root, r"\.export-\w{8}")  # staging folders of a killed export
        with staging(paths.root, ".export-") as tmp:
            started = time.time()
            name = _build_gguf(paths.merged, tmp, gguf_name(run, quant), quant, log_path)
            print(f"parity check: llama.cpp vs transformers on {cfg.export.parity_examples} eval prompts...", flush=True)
            report = check_parity(paths.merged, tmp / name, cfg, examples, quant, progress=progress)
            report["seconds"] = round(time.time() - started, 1)
            modelfile = modelfile_text(name, _merged_tokenizer(paths.merged), cfg, report["add_bos"])
            _install_export(paths, tmp, name, modelfile, report)
    _print_export(paths.root / "export" / name, report)
    return report


def _export_settings(paths, quant: str | None, overrides) -> tuple:
    """The run's configuration and GGUF type, after checking that export can run: a fresh merged
    model, a known type, llama.cpp and its converter."""
    require(paths, "config")
    if not (paths.merged / "config.json").exists():
        raise MissingStageError(f"{paths.merged} holds no merged model: run notebook 06_merge_and_chat's merge "
                                f"first (or `python -m lib merge --run {paths.root.name}`)")
    check_fresh(paths, "merge", paths.merged)  # a merged model of an earlier adapter is refused
    cfg = apply_overrides(load_config(paths.config), overrides or [])  # its one "None keeps" rule
    quant = (quant or cfg.export.quant).lower()
    if quant not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type '{quant}' (one of {', '.join(QUANT_TYPES)})")
    llama_cpp_version()
    converter_dir()
    return cfg, quant


def _build_gguf(merged: Path, tmp: Path, name: str, quant: str, log_path: Path) -> str:
    """tmp/name: merged/ converted by llama.cpp's converter, then quantized when the type needs it."""
    outtype, quantized = QUANT_TYPES[quant][0] or intermediate_type(merged), QUANT_TYPES[quant][1] is not None
    print(f"converting {merged} to a {outtype} GGUF (llama.cpp convert_hf_to_gguf.py)...", flush=True)
    full = convert(merged, tmp / (f"{name[:-len('.gguf')]}-{outtype}.gguf" if quantized else name), outtype, log_path)
    if quantized:
        print(f"quantizing to {quant} (llama.cpp llama_model_quantize)...", flush=True)
        quantize(full, tmp / name, quant, log_path)
        full.unlink()
    return name


def _install_export(paths, tmp: Path, name: str, modelfile: str, report: dict) -> None:
    """The GGUF, its Modelfile and parity.json moved into export/ as one set, with a manifest (lib/rundir.py)."""
    (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    write_json(tmp / "parity.json", report)
    files = (name, "Modelfile", "parity.json")
    install(paths, "export", {paths.root / "export" / f: tmp / f for f in files},
            [f"export/{f}" for f in files], inputs(paths, "merge"))


def _print_export(gguf: Path, report: dict) -> None:
    p = report["perplexity"]
    print(f"exported {gguf} ({report['gguf_mb']} MB): perplexity {p['llama_cpp']['perplexity']:.4f} "
          f"llama.cpp vs {p['transformers']['perplexity']:.4f} transformers (drift {p['relative_drift']:.2%}), "
          f"greedy agreement {report['greedy']['agreement']:.0%} over {report['greedy']['tokens']} tokens, stop rate "
          f"{report['stop_rate']['llama_cpp']:.0%} vs {report['stop_rate']['transformers']:.0%}")
    for f in report["failures"]:
        print(f"WARNING: parity check failed: {f}")


def _merged_tokenizer(folder):
    """The tokenizer (with the chat template) exactly as merged/ holds it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def parity_table(report: dict):
    """The parity report as a small table (a pandas DataFrame) for notebook 06."""
    import pandas as pd

    p, g, s, t = report["perplexity"], report["greedy"], report["stop_rate"], report["prompt_tokens"]
    rows = [
        ("GGUF", f"{report['gguf']} ({report['gguf_mb']} MB)"),
        ("prompts with identical tokens (llama.cpp / GGUF template / Modelfile)",
         f"{t['identical']} / {t['identical_from_gguf_template']} / {t['identical_from_modelfile_template']} "
         f"of {report['prompts']}"),
        (f"greedy answers identical over {g['tokens']} tokens (minimum)", f"{g['agreement']:.0%} ({g['min_agreement']:.0%})"),
        ("perplexity llama.cpp / transformers", f"{p['llama_cpp']['perplexity']:.4f} / {p['transformers']['perplexity']:.4f}"),
        ("relative perplexity drift (tolerance)", f"{p['relative_drift']:.3%} ({p['tolerance'] * 100:.3g}%)"),
        ("stop rate llama.cpp / transformers", f"{s['llama_cpp']:.0%} / {s['transformers']:.0%}"),
        ("stop tokens end generation in the GGUF", "yes" if report["stop_tokens"]["end_of_generation_in_gguf"] else "NO"),
        ("check", "ok" if report["ok"] else "FAILED: " + "; ".join(report["failures"])),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"]).set_index("measure")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--convert":
    _convert_main(sys.argv[2], sys.argv[3:])
