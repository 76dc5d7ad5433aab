"""llama.cpp's converter and quantizer: finding (or fetching) the converter, merged/ -> a GGUF, quantizing it.

    from lib.ship.llamacpp import build_gguf, converter_dir, ensure_llama_cpp
    converter_dir()                                  # ~/.cache/qlora-notebooks/llama.cpp-<version>/
    build_gguf(merged, folder, "demo-q8_0.gguf", "q8_0", log_path)

The conversion is llama.cpp's own: `convert_hf_to_gguf.py` (with its `conversion/` package and
`gguf-py/`) turns merged/ into a 16/32-bit GGUF (run as `python -m lib.ship.llamacpp --convert FOLDER
MODEL_DIR --outfile F --outtype T`, in a subprocess), and llama.cpp's quantizer (`llama_model_quantize`,
exposed by llama-cpp-python) makes q8_0, q4_k_m, ... from it. The chat template and the end-of-turn
tokens travel in the GGUF metadata (`tokenizer.chat_template`, eos/eot ids).

Where the converter comes from: the llama-cpp-python source distribution on PyPI carries llama.cpp
(`vendor/llama.cpp/`). On first use `pip download` fetches the sdist of the installed
llama-cpp-python version (76 MB) and the three converter pieces are extracted into
`~/.cache/qlora-notebooks/llama.cpp-<version>/` ($XDG_CACHE_HOME respected), so converter and
runtime are the same llama.cpp. `make install` does this once; offline, set LLAMA_CPP_DIR to a
llama.cpp checkout (any folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lib.run.errors import SFTError
from lib.run.paths import REPO_ROOT
from lib.run.rundir import staging

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
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"


class ExportError(SFTError):
    """The model cannot be exported as asked (no converter, unknown type, conversion failed)."""


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
    return ExportError(f"{model_dir}: llama.cpp's converter failed: {why[:300]} (full log: {log_path}); its last "
                       f"lines: {log_tail(log_path)}")


def convert(model_dir, out_file, outtype: str, log_path) -> Path:
    """merged/ -> a GGUF of type f32, f16 or bf16 with llama.cpp's convert_hf_to_gguf.py."""
    folder = converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lib.ship.llamacpp", "--convert", str(folder), str(model_dir),
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
    """Send llama.cpp's quantizer log to a file: what C code writes on file descriptors 1 and 2, and what
    llama-cpp-python's log callback prints to sys.stderr (in Jupyter that is the kernel's stream, not fd 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f, open(path, "a", encoding="utf-8", errors="replace") as text, \
            contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def log_tail(log_path, lines: int = 5) -> str:
    """The last lines of logs/export.log on one line ('a | b'): shown in the error when a step fails, never
    otherwise (the log stays in the file; an error is one line)."""
    try:
        text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(ln.strip()[:160] for ln in [ln for ln in text.splitlines() if ln.strip()][-lines:]) or "(empty log)"


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
        raise ExportError(f"{in_file}: llama.cpp's quantizer failed to make {quant} (status {rc}; log: {log_path}); "
                          f"its last lines: {log_tail(log_path)}")
    return Path(out_file)


def intermediate_type(model_dir) -> str:
    """The lossless GGUF type for merged/'s weights: f32 for fp32, bf16 for bf16, else f16."""
    try:
        dtype = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("dtype") \
            or json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    except (OSError, ValueError):
        dtype = None
    return {"float32": "f32", "bfloat16": "bf16"}.get(str(dtype), "f16")


def build_gguf(merged: Path, folder: Path, name: str, quant: str, log_path: Path) -> str:
    """folder/name: merged/ converted by llama.cpp's converter, then quantized when the type needs it."""
    outtype, quantized = QUANT_TYPES[quant][0] or intermediate_type(merged), QUANT_TYPES[quant][1] is not None
    print(f"converting {merged} to a {outtype} GGUF (llama.cpp convert_hf_to_gguf.py)...", flush=True)
    full = convert(merged, folder / (f"{name[:-len('.gguf')]}-{outtype}.gguf" if quantized else name), outtype,
                   log_path)
    if quantized:
        print(f"quantizing to {quant} (llama.cpp llama_model_quantize)...", flush=True)
        quantize(full, folder / name, quant, log_path)
        full.unlink()
    return name


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--convert":
    _convert_main(sys.argv[2], sys.argv[3:])
